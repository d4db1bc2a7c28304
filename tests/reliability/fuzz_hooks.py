"""Schemathesis hooks for tests/reliability/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

`positive_data_accepted`: schemathesis' positive_data_acceptance, with the two refusals a schema cannot express and
the document states: a prompt over its limit in CLIP tokens (`x-max-tokens`; 400 `string_above_max_length` naming
prompt or negative_prompt), and an Idempotency-Key sent again with another body (422 `idempotency_key_reused`; the
fuzzer reuses header values across bodies). Any other 4xx for schema-valid data fails, as in the built-in check;
operations documented to refuse every request (images.edit / create_variation: no 2xx) are not judged.
"""

from __future__ import annotations

import json

import schemathesis

ACCEPTED = {"401", "403", "404", "409", "429"}


@schemathesis.check
def positive_data_accepted(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    documented = case.operation.definition.raw.get("responses", {})
    if not any(str(status).startswith("2") for status in documented):
        return None  # an operation documented to refuse every request (images.edit / create_variation)
    status = response.status_code
    if 200 <= status < 400 or str(status) in ACCEPTED or status >= 500:  # 5xx is not_a_server_error's
        return None
    if status == 400:
        try:
            error = json.loads(response.content)["error"]
        except (ValueError, KeyError, TypeError):
            error = {}
        if error.get("code") == "string_above_max_length" and error.get("param") in ("prompt", "negative_prompt"):
            return None
        raise AssertionError(f"schema-valid data rejected with 400: {error}")
    if status == 422 and _error(response).get("code") == "idempotency_key_reused":
        return None
    raise AssertionError(f"schema-valid data rejected with {status}: {_error(response)}")


def _error(response) -> dict:
    try:
        return json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return {}
