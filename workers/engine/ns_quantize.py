"""Quantize a model to neural-speed's INT8 file: run as a child process by int8_cache.

neural-speed 1.0's own converter (`neural_speed.convert`) only finds sharded
`model-0000N-of-*.safetensors`, wants a separate lm_head and a sentencepiece `tokenizer.model`,
and its graphs abort on layer counts outside their table. So the bundle uses the converter's
pieces as a library (its lazy safetensors loader, its HF -> graph tensor mapping, its file writer)
and does the rest itself:
- any checkpoint layout: one `model.safetensors`, shards, or `pytorch_model.bin`;
- a tied lm_head is written as a copy of the embedding;
- the vocabulary is written from the model's own tokenizer (the bundle tokenizes; neural-speed
  only needs the table's size and the special ids from the header);
- layers are padded with identity layers (all weights zero: attention and MLP add 0 to the residual)
  up to the next count the graph knows (Family data `NeuralSpeedGraph.layer_counts`).
Then neural-speed's own `quant_model` writes the INT8 weights with its bestla kernels' layout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("ns_quantize")

WEIGHTS = "model.bin"      # the INT8 file in the cache entry
GRAPH_INFO = "neural_speed.json"


def padded_layers(n_layer: int, counts: tuple[int, ...]) -> int:
    """The smallest layer count the graph knows that holds `n_layer` layers."""
    fitting = [c for c in sorted(counts) if c >= n_layer]
    if not fitting:
        raise ValueError(f"{n_layer} layers: the graph takes at most {max(counts)}")
    return fitting[0]


def _load_checkpoint(source: Path):
    from neural_speed.convert import convert_llama as ne

    single = source / "model.safetensors"
    if single.is_file():
        return dict(ne.lazy_load_file(single).model)
    return dict(ne.load_some_model(source).model)  # shards, or pytorch_model.bin


def _constant_like(tensor, value: float):
    import numpy as np
    from neural_speed.convert import convert_llama as ne

    def load():
        return ne.UnquantizedTensor(np.full(tensor.shape, value, dtype=np.float32))
    return ne.LazyTensor(load, tensor.shape, ne.DT_F32, f"constant {value}")


def add_identity_layers(model: dict, n_layer: int, target: int) -> None:
    """Layers n_layer..target-1 with every weight zero (norm weights one): each leaves its input unchanged."""
    template = {k[len("model.layers.0."):]: t for k, t in model.items() if k.startswith("model.layers.0.")}
    for i in range(n_layer, target):
        for name, tensor in template.items():
            model[f"model.layers.{i}.{name}"] = _constant_like(tensor, 1.0 if "norm" in name else 0.0)


def vocabulary(source: Path, size: int, trust_remote_code: bool):
    """The token table for the file header: each id's text from the model's own tokenizer."""
    from neural_speed.convert import convert_llama as ne
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    table = [(tokenizer.convert_tokens_to_string([t]).encode("utf-8", "replace") if t else b"", 0.0) for t in tokens]
    return ne.NEVocab(table + [(b"", 0.0)] * (size - len(table)))


def convert_f32(source: Path, out: Path, counts: tuple[int, ...], trust_remote_code: bool) -> dict:
    """Write the fp32 graph file; returns what the entry records about the layer padding."""
    from neural_speed.convert import convert_llama as ne

    model = _load_checkpoint(source)
    if "lm_head.weight" not in model:  # tie_word_embeddings: the output matrix is the embedding
        model["lm_head.weight"] = model["model.embed_tokens.weight"]
    params = ne.Params.loadHFTransformerJson(model, source / "config.json")
    target = padded_layers(params.n_layer, counts)
    info = {"layers": params.n_layer, "graph_layers": target}
    if target > params.n_layer:
        log.info("padding %d layers with %d identity layers (the graph knows %s layers)", params.n_layer,
                 target - params.n_layer, "/".join(map(str, counts)))
        add_identity_layers(model, params.n_layer, target)
        params.n_layer = target
    vocab = vocabulary(source, params.n_vocab, trust_remote_code)
    model = ne.convert_to_output_type(ne.do_necessary_conversions(model, params), ne.NEFileType.AllF32)
    ne.OutputFile.write_all(out, params, model, vocab, ne.NEFileType.AllF32)
    return info


def quantize_and_save(source: Path, staging: Path, module: str, counts: tuple[int, ...], settings: dict,
                      trust_remote_code: bool) -> None:
    import importlib

    from workers.engine.quantize import check_memory

    t0 = time.monotonic()
    check_memory(source)
    # The fp32 intermediate (4 bytes per weight: 28 GB for a 7 B model) goes into the staging folder,
    # on the cache's disk rather than a tmpfs /tmp, and is deleted with it if anything fails.
    f32 = staging / "model-f32.bin.partial"
    log.info("[1/2] converting %s to neural-speed's %s graph file (fp32)", source.name, module)
    info = convert_f32(source, f32, counts, trust_remote_code)
    log.info("[2/2] quantizing to INT8 with neural-speed (%s)", settings)
    cpp = importlib.import_module(f"neural_speed.{module}_cpp")
    cpp.Model.quant_model(model_path=str(f32), out_path=str(staging / WEIGHTS), weight_dtype=settings["weight_dtype"],
                          alg="sym", group_size=settings["group_size"], scale_dtype=settings["scale_dtype"],
                          compute_dtype=settings["compute_dtype"], use_ggml=False)
    f32.unlink()
    if not (staging / WEIGHTS).is_file():
        raise RuntimeError("neural-speed's quant_model wrote no file")
    (staging / GRAPH_INFO).write_text(json.dumps({"module": module, **info, "settings": settings}, indent=2))
    log.info("quantized in %.0f s", time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="quantize one model into a neural-speed INT8 cache folder")
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--staging", type=Path, required=True)
    parser.add_argument("--settings", required=True, help="the INT8 settings as JSON")
    parser.add_argument("--module", required=True, help="neural-speed graph module, e.g. llama")
    parser.add_argument("--layer-counts", required=True, help="the graph's layer counts, comma-separated")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from workers.engine.quantize import run_quantizer

    return run_quantizer(lambda: quantize_and_save(args.source, args.staging, args.module,
                                                   tuple(int(c) for c in args.layer_counts.split(",")),
                                                   json.loads(args.settings), args.trust_remote_code))


if __name__ == "__main__":
    sys.exit(main())
