"""UNet backends: ONNX export + ONNX Runtime parity, the artifact cache, and TensorRT's library-free parts."""

import json

import numpy as np
import pytest
import torch

from service.contracts.manifest import ModelSpec
from service.worker.artifacts import ArtifactCache, ArtifactKey, ShapeProfile, profile_for, weights_digest
from service.worker.backends import UnknownBackendError, get_backend
from service.worker.backends.onnx_export import example_inputs
from service.worker.backends.ort import OnnxRuntimeBackend
from service.worker.backends.trt import engine_key, profile_shapes, tensorrt_available
from service.worker.pipeline import generate, load_pipeline
from service.worker.runner import ImageRequest
from tests.conftest import ROOT


def _spec(base, kind, backend="onnxruntime", sizes=("64x64", "128x128")):
    return ModelSpec(name="m", kind=kind, base=str(base), defaults={"steps": 20, "guidance": 5.0, "size": sizes[0]},
                     sizes=list(sizes), max_n=4, backend=backend)


@pytest.fixture(scope="module")
def smoke_xl(smoke_model, tmp_path_factory):
    from training.train_base import train_base

    return train_base("smoke-xl", tmp_path_factory.mktemp("xl") / "m", seed=0, vae_from=smoke_model / "vae")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One artifact cache for the module: later tests reuse earlier exports (cache hits)."""
    return tmp_path_factory.mktemp("engines")


def _models(smoke_model, smoke_xl):
    tiny, tiny_xl = ROOT / "models" / "spo-tiny", ROOT / "models" / "spo-tiny-xl"
    return [(tiny if (tiny / "model_index.json").exists() else smoke_model, "sd15"),
            (tiny_xl if (tiny_xl / "model_index.json").exists() else smoke_xl, "sdxl")]


def test_onnxruntime_unet_matches_torch(smoke_model, smoke_xl, shared_cache):
    """fp32 CPU parity <= 1e-4 max abs, batch 1/2/4, two sizes, SD and SDXL."""
    for base, kind in _models(smoke_model, smoke_xl):
        pipe = load_pipeline(str(base))
        ort_unet = OnnxRuntimeBackend(cache_dir=shared_cache).prepare(pipe, _spec(base, kind))
        for batch in (1, 2, 4):
            for hw in ((8, 8), (16, 16)):
                inputs = example_inputs(ort_unet.profile, batch, hw, torch.float32)
                added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]} if kind == "sdxl" \
                    else None
                with torch.no_grad():
                    ref = pipe.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                    added_cond_kwargs=added).sample
                got = ort_unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                               added_cond_kwargs=added).sample
                err = (got - ref).abs().max().item()
                assert err <= 1e-4, (kind, batch, hw, err)


def test_pipeline_images_on_onnxruntime_equal_torch(smoke_model, smoke_xl, shared_cache):
    for base, kind in _models(smoke_model, smoke_xl):
        pipe = load_pipeline(str(base))
        reqs = [ImageRequest("a red circle on a blue background", 7),
                ImageRequest("a blue square on a red background", 8)]
        ref = generate(pipe, reqs, steps=4, guidance=5.0, width=64, height=64)
        pipe.unet = OnnxRuntimeBackend(cache_dir=shared_cache).prepare(pipe, _spec(base, kind))
        got = generate(pipe, reqs, steps=4, guidance=5.0, width=64, height=64)
        for a, b in zip(ref, got, strict=True):
            assert np.abs(a.astype(float) - b.astype(float)).mean() <= 1.0


def test_onnxruntime_vae_decoder_matches_torch_and_is_cached(smoke_model, smoke_xl, shared_cache):
    """The decoder `AutoencoderKL.decode` calls: fp32 CPU parity <= 1e-4 max abs, batch 1/2/4, two sizes, SD and
    SDXL; a second prepare is a cache hit (no new entry)."""
    for base, kind in _models(smoke_model, smoke_xl):
        pipe = load_pipeline(str(base))
        backend = OnnxRuntimeBackend(cache_dir=shared_cache)
        decoder = backend.prepare_vae_decoder(pipe, _spec(base, kind))
        entries = sorted((shared_cache / "onnx-vae-decoder").iterdir())
        backend.prepare_vae_decoder(pipe, _spec(base, kind))
        assert sorted((shared_cache / "onnx-vae-decoder").iterdir()) == entries
        channels = pipe.vae.decoder.conv_in.in_channels
        for batch in (1, 2, 4):
            for hw in ((8, 8), (16, 16)):
                z = torch.randn(batch, channels, *hw, generator=torch.Generator().manual_seed(batch))
                with torch.no_grad():
                    ref = pipe.vae.decoder(z)
                got = decoder(z)
                assert got.shape == ref.shape == (batch, 3, 8 * hw[0], 8 * hw[1])
                err = (got - ref).abs().max().item()
                assert err <= 1e-4, (kind, batch, hw, err)
        with pytest.raises(ValueError, match="batch 5"):  # max_n 4: the decoder profile holds 4 images
            decoder(torch.randn(5, channels, 8, 8))


def test_runner_with_the_vae_decoder_on_onnxruntime_equals_torch(smoke_model, shared_cache, monkeypatch):
    """`compile_vae_decoder: true` installs the ONNX Runtime decoder in the served pipeline; images stay within
    1/255 mean abs of the torch backend's."""
    from service.worker.model_runner import ModelRunner

    monkeypatch.setenv("SPO_ENGINE_CACHE", str(shared_cache))
    reqs = [ImageRequest("a red circle on a blue background", 7), ImageRequest("a blue square on a red background", 8)]
    images = {}
    for name, update in (("torch", {"backend": "torch"}),
                         ("ort", {"backend": "onnxruntime", "compile_vae_decoder": True})):
        runner = ModelRunner(_spec(smoke_model, "sd15").model_copy(update=update)).load()
        if name == "ort":
            assert type(runner.pipe.vae.decoder).__name__ == "OrtVAEDecoder"
        images[name] = runner.run(reqs, width=64, height=64, steps=4, guidance=5.0)
    for a, b in zip(images["torch"], images["ort"], strict=True):
        assert np.abs(a.astype(float) - b.astype(float)).mean() <= 1.0


def test_compile_vae_decoder_needs_a_backend_that_compiles_it(smoke_model):
    torch_spec = _spec(smoke_model, "sd15", backend="torch")
    with pytest.raises(ValueError, match="compile_vae_decoder needs backend onnxruntime or compile"):
        ModelSpec(**{**torch_spec.model_dump(), "compile_vae_decoder": True})
    with pytest.raises(ValueError, match="does not compile the VAE decoder"):
        get_backend("torch").prepare_vae_decoder(None, torch_spec)


def test_cuda_graphs_pick_the_compile_mode_and_need_a_cuda_device(smoke_model, monkeypatch):
    from service.worker.backends.torch_compile import CompileBackend

    monkeypatch.delenv("SPO_COMPILE_MODE", raising=False)
    spec = _spec(smoke_model, "sd15", backend="compile")
    graphs = spec.model_copy(update={"cuda_graphs": True})
    assert CompileBackend().mode_for(spec) == "default"  # the mode measured on the H100
    assert CompileBackend().mode_for(graphs) == "reduce-overhead"
    monkeypatch.setenv("SPO_COMPILE_MODE", "max-autotune")  # the operator's override wins
    assert CompileBackend().mode_for(graphs) == "max-autotune"
    with pytest.raises(RuntimeError, match="cuda_graphs needs a CUDA device"):
        CompileBackend().prepare(load_pipeline(str(smoke_model)), graphs)


def test_onnx_file_interface(smoke_model, shared_cache):
    import onnx

    pipe = load_pipeline(str(smoke_model))
    unet = OnnxRuntimeBackend(cache_dir=shared_cache).prepare(pipe, _spec(smoke_model, "sd15"))
    model = onnx.load(str(unet.model_path))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert inputs["timestep"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inputs["sample"].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    assert [o.name for o in model.graph.output] == ["out_sample"]


def test_cache_hit_miss_and_never_a_mismatched_entry(smoke_model, tmp_path):
    pipe = load_pipeline(str(smoke_model))
    backend = OnnxRuntimeBackend(cache_dir=tmp_path)
    backend.prepare(pipe, _spec(smoke_model, "sd15"))
    entries = list((tmp_path / "onnx").iterdir())
    assert len(entries) == 1
    backend.prepare(pipe, _spec(smoke_model, "sd15"))  # hit: no new entry
    assert len(list((tmp_path / "onnx").iterdir())) == 1
    backend.prepare(pipe, _spec(smoke_model, "sd15", sizes=("64x64",)))  # another shape profile: another entry
    assert len(list((tmp_path / "onnx").iterdir())) == 2
    with torch.no_grad():  # other weights (e.g. another LoRA scale): another key
        next(pipe.unet.parameters()).add_(0.01)
    backend.prepare(pipe, _spec(smoke_model, "sd15"))
    assert len(list((tmp_path / "onnx").iterdir())) == 3


def test_tampered_or_partial_entry_is_a_miss(tmp_path):
    profile = ShapeProfile(1, 2, 8, ((8, 8),), 16, 64)
    key = ArtifactKey("w", "onnx", "1", "cpu", profile)
    cache = ArtifactCache(tmp_path)
    with cache.building(key) as d:
        (d / "unet.onnx").write_text("x")
    assert cache.lookup(key) == cache.path(key)
    meta = json.loads((cache.path(key) / "meta.json").read_text())
    meta["device"] = "NVIDIA A100"
    (cache.path(key) / "meta.json").write_text(json.dumps(meta))
    assert cache.lookup(key) is None
    with pytest.raises(RuntimeError), cache.building(ArtifactKey("w2", "onnx", "1", "cpu", profile)):
        raise RuntimeError("build failed")
    assert cache.lookup(ArtifactKey("w2", "onnx", "1", "cpu", profile)) is None


def test_weights_digest_tracks_values():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    b = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert weights_digest(a) == weights_digest(b)
    b["b"][0] = 1e-6
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest({"w": torch.ones(3).half()}) != weights_digest({"w": torch.ones(3)})


def test_out_of_profile_inputs_are_clear_errors(smoke_model, shared_cache):
    pipe = load_pipeline(str(smoke_model))
    backend = OnnxRuntimeBackend(cache_dir=shared_cache)
    unet = backend.prepare(pipe, _spec(smoke_model, "sd15", sizes=("64x64",)))
    assert backend.max_images() == 4  # the worker caps its batches there
    x = example_inputs(unet.profile, 9, (8, 8), torch.float32)  # max_n 4 -> UNet batch <= 8
    with pytest.raises(ValueError, match="batch 9"):
        unet(x["sample"], x["timestep"], x["encoder_hidden_states"])
    x = example_inputs(unet.profile, 2, (16, 16), torch.float32)
    with pytest.raises(ValueError, match="latent size 16x16"):
        unet(x["sample"], x["timestep"], x["encoder_hidden_states"])


def test_tensorrt_profile_covers_cfg_batch_and_every_size():
    from types import SimpleNamespace

    sd = SimpleNamespace(cross_attention_dim=768, addition_embed_type=None)
    p = profile_for(sd, [(512, 512), (768, 512)], max_images=4, text_len=77)
    shapes = profile_shapes(p)
    assert shapes["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 96))
    assert shapes["encoder_hidden_states"][2] == (8, 77, 768)
    assert set(shapes) == {"sample", "timestep", "encoder_hidden_states"}
    xl = SimpleNamespace(cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2816)
    shapes = profile_shapes(profile_for(xl, [(1024, 1024)], max_images=2, text_len=77))
    assert shapes["text_embeds"] == ((1, 1280), (2, 1280), (4, 1280))
    assert shapes["time_ids"][2] == (4, 6)


def test_tensorrt_engine_key_depends_on_gpu_and_version():
    profile = ShapeProfile(1, 2, 8, ((64, 64),), 77, 768)
    onnx_key = ArtifactKey("w", "onnx", "1.16", "any", profile)
    keys = {engine_key(onnx_key, v, g, True).digest for v in ("10.3", "10.4") for g in ("H100", "A10G")}
    assert len(keys) == 4
    assert engine_key(onnx_key, "10.3", "H100", True).digest != engine_key(onnx_key, "10.3", "H100", False).digest


def test_unavailable_backends_fail_loudly():
    with pytest.raises(UnknownBackendError, match="available"):
        get_backend("tvm")
    if not tensorrt_available():
        with pytest.raises(RuntimeError, match="TensorRT"):
            get_backend("tensorrt")


@pytest.mark.skipif(not tensorrt_available() or not torch.cuda.is_available(),
                    reason="needs the tensorrt package and a CUDA GPU (neither is installable on the dev machines)")
def test_tensorrt_engine_matches_torch(smoke_model, tmp_path):
    pipe = load_pipeline(str(smoke_model), device="cuda")
    spec = _spec(smoke_model, "sd15", backend="tensorrt").model_copy(update={"device": "cuda"})
    from service.worker.backends.trt import TensorRTBackend

    unet = TensorRTBackend(cache_dir=tmp_path).prepare(pipe, spec)
    x = example_inputs(unet.profile, 2, (8, 8), torch.float32, "cuda")
    with torch.no_grad():
        ref = pipe.unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
    got = unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
    assert (got - ref).abs().max().item() < 1e-3


def test_spo_export_writes_the_onnx_interface_and_names_bad_flags(smoke_model, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "out"
    assert main(["export", "--model", str(smoke_model), "--backend", "onnxruntime", "--out", str(out),
                 "--cache", str(tmp_path / "cache")]) == 0
    assert (out / "unet.onnx").is_file() and (out / "unet.meta.json").is_file()
    for argv, flag in ((["--model", "no-such-model"], "--model"), (["--model", str(smoke_model), "--sizes", "65x64"],
                                                                   "--sizes")):
        with pytest.raises(SystemExit):
            main(["export", "--backend", "onnxruntime", "--cache", str(tmp_path / "cache"), *argv])
        assert flag in capsys.readouterr().err
    if not tensorrt_available():  # refused before any weights load, naming the flag and what is missing
        for device, says in (("cpu", "--device cuda"), ("cuda", "TensorRT Python package")):
            with pytest.raises(SystemExit):
                main(["export", "--model", str(smoke_model), "--backend", "tensorrt", "--device", device,
                      "--cache", str(tmp_path / "cache")])
            err = capsys.readouterr().err
            assert "--backend tensorrt" in err and says in err, err


def test_spo_export_prebuilds_the_vae_decoder_when_the_manifest_asks(smoke_model, tmp_path):
    import yaml

    from service.cli import main

    manifest = tmp_path / "models.yaml"
    entry = {**_spec(smoke_model, "sd15", sizes=("64x64",)).model_dump(), "name": "m-vae", "compile_vae_decoder": True}
    manifest.write_text(yaml.safe_dump({"models": [entry]}))
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["export", "--model", "m-vae", "--manifest", str(manifest), "--backend", "onnxruntime",
                 "--out", str(out), "--cache", str(cache)]) == 0
    assert {p.name for p in out.iterdir()} >= {"unet.onnx", "unet.meta.json", "vae_decoder.onnx",
                                               "vae_decoder.meta.json"}
    assert len(list((cache / "onnx-vae-decoder").iterdir())) == 1  # in the cache, where the worker looks


@pytest.mark.slow  # inductor compiles the UNet and the decoder with the C++ backend: ~3 minutes on 2 CPU cores
def test_compile_backend_matches_eager_for_unet_and_vae_decoder(smoke_model):
    pipe = load_pipeline(str(smoke_model))
    spec = _spec(smoke_model, "sd15", backend="compile").model_copy(update={"compile_vae_decoder": True})
    backend = get_backend("compile")
    unet, decoder = backend.prepare(pipe, spec), backend.prepare_vae_decoder(pipe, spec)
    assert unet is not pipe.unet and decoder is not pipe.vae.decoder
    x = example_inputs(ShapeProfile(1, 2, 2, ((8, 8),), text_len=pipe.tokenizer.model_max_length,
                                     text_dim=pipe.unet.config.cross_attention_dim), 2, (8, 8), torch.float32)
    z = torch.randn(2, pipe.vae.decoder.conv_in.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
        got = unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
        assert (got - ref).abs().max().item() <= 1e-4
        assert (decoder(z) - pipe.vae.decoder(z)).abs().max().item() <= 1e-4


def test_warmup_compiles_every_shape_class_before_requests(smoke_model, monkeypatch):
    """torch.compile recompiles per new shape (~50 s on an H100): the worker's warm-up must call the largest batch
    and every allowed size once; a backend without per-shape compiles keeps the single small call."""
    from service.worker.model_runner import ModelRunner

    assert get_backend("compile").compiles_per_shape and not get_backend("torch").compiles_per_shape
    runner = ModelRunner(_spec(smoke_model, "sd15", backend="torch"))  # sizes 64x64 + 128x128, max_n 4
    calls = []
    monkeypatch.setattr(runner, "run", lambda requests, *, width, height, steps, guidance, on_step=None:
                        calls.append((len(requests), width, height, steps)))
    runner.warmup(max_images=8)
    assert calls == [(1, 64, 64, 1)]
    calls.clear()
    runner.backend.compiles_per_shape = True
    runner.warmup(max_images=8)  # the worker's max_batch: a batch can hold two 4-image requests
    assert calls == [(1, 64, 64, 1), (8, 64, 64, 1), (1, 128, 128, 1)]
    calls.clear()
    monkeypatch.setattr(runner.backend, "max_images", lambda: 6)  # an engine built for at most 6 images
    runner.warmup(max_images=8)
    assert calls[1] == (6, 64, 64, 1)


@pytest.mark.slow  # inductor compiles the tiny UNet three times on the CPU: minutes
def test_after_warmup_no_request_shape_recompiles(smoke_model):
    """The claim warm-up rests on: after one call at the largest batch and one at each other size, dynamo's graph is
    dynamic in batch and size, so other batch sizes and sizes run without compiling again."""
    from torch._dynamo.utils import counters

    from service.worker.model_runner import ModelRunner

    torch._dynamo.reset()
    runner = ModelRunner(_spec(smoke_model, "sd15", backend="compile")).load()
    runner.warmup(max_images=4)
    compiled = counters["stats"]["unique_graphs"]
    for n, size in ((2, 64), (3, 128), (4, 128)):
        runner.run([ImageRequest("a red circle on a blue background", i) for i in range(n)], width=size,
                   height=size, steps=2, guidance=5.0)
    assert counters["stats"]["unique_graphs"] == compiled, "a request shape compiled again after warm-up"
