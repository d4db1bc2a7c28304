"""The HTTP entrypoint: FastAPI app, auth, request validation, job events. Imports no torch."""
