"""Quantize a model to neural-speed's INT8 file: run as a child process by int8_cache.

neural-speed 1.0's own converter (`neural_speed.convert`) only finds sharded
`model-0000N-of-*.safetensors`, wants a separate lm_head and a sentencepiece `tokenizer.model`,
and its graphs abort on layer counts outside their table. So the bundle uses the converter's
pieces as a library (its lazy safetensors loader, its HF -> graph tensor mapping, its file writer)
and does the rest itself:
- any checkpoint layout: one `model.safetensors`, shards, or `pytorch_model.bin`;
- a tied lm_head is written as a copy of the embedding;
- the file header and tensor names per graph: llama through the library's own mapping; qwen and
  chatglm2 (ChatGLM3), whose own converters load the whole model in fp32 with transformers (31 GB
  for Qwen-7B, more than the machine has), from the checkpoint's tensors one at a time;
- the vocabulary is written from the model's own tokenizer (the bundle tokenizes; neural-speed
  only needs the table's size and the special ids from the header);
- layers are padded with identity layers (all weights zero: attention and MLP add 0 to the residual)
  up to the next count the graph knows (Family data `NeuralSpeedGraph.layer_counts`).
Then neural-speed's own `quant_model` writes the INT8 weights with its bestla kernels' layout, and
the embedding table it leaves in 4-bit GGML Q4_0 is rewritten in INT8 GGML Q8_0 (ne_file).
"""
from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path

from workers.engine.runtimes.neural_speed import ne_file
from workers.engine.quantize_child import NotEnoughRoom
from workers.models.families import NeuralSpeedGraph, neural_speed_graph

log = logging.getLogger("ns_quantize")

WEIGHTS = "model.bin"      # the INT8 file in the cache entry
GRAPH_INFO = "neural_speed.json"
# Part of the cache key: a new value rebuilds the entries written before. 2: embedding tables in Q8_0.
FILE_LAYOUT = 2
# neural-speed's quantizer names its weight dtypes per bits (ITREX's RtnConfig says int4_clip for 4).
WEIGHT_DTYPES = {8: "int8", 4: "int4"}
# With 4 bits, the graph's output matrix is written in GGML Q8_0 rather than INT4 (as llama.cpp's Q4_0 keeps its
# output at more bits): the embedded model's perplexity cost falls by about a third for no measurable decode
# speed (docs/int8.md "4-bit weights"). Measured on the llama graph only; the others keep INT4 there.
INT8_OUTPUT_AT_4_BITS = {"llama": "output.weight"}


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


def add_identity_layers(model: dict, graph: NeuralSpeedGraph, n_layer: int, target: int) -> None:
    """Layers n_layer..target-1 with every weight zero (norm weights one): each leaves its input unchanged."""
    first = f"{graph.layer_prefix}0."
    template = {k[len(first):]: t for k, t in model.items() if k.startswith(first)}
    for i in range(n_layer, target):
        for name, tensor in template.items():
            model[f"{graph.layer_prefix}{i}.{name}"] = _constant_like(tensor, 1.0 if graph.norm_marker in name else 0.0)


def vocabulary(source: Path, size: int, trust_remote_code: bool):
    """The token table for the file header: each id's text from the model's own tokenizer."""
    from neural_speed.convert import convert_llama as ne
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    table = [(tokenizer.convert_tokens_to_string([t]).encode("utf-8", "replace") if t else b"", 0.0) for t in tokens]
    return ne.NEVocab(table + [(b"", 0.0)] * (size - len(table)))


def _header_token_ids(source: Path, config: dict) -> tuple[int, int]:
    """(bos, eos) for the file header: config.json's, else generation_config.json's end-of-text id."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(str(source)).to_dict()
    except OSError:
        generation = {}
    ids = [config.get(key, generation.get(key)) for key in ("bos_token_id", "eos_token_id")]
    ids = [i[0] if isinstance(i, list) else i for i in ids]
    eos = ids[1] if isinstance(ids[1], int) else -1
    return (ids[0] if isinstance(ids[0], int) else eos), eos


# Byte offsets of header fields neural_speed.convert's OutputFile (written for its llama graph) leaves
# at 0 or fills differently: after the magic, version, n_vocab, n_embd, n_mult, n_head, n_head_kv,
# n_layer (int32s) come n_rot, ftype, max_seq_len, alibi, clip, par_res, word_embed_proj_dim,
# do_layer_norm_before, multi_query_group_num, ffn_hidden_size, ...
HEADER_OFFSETS = {"n_rot": 32, "max_seq_len": 40, "multi_query_group_num": 64}


def graph_header(graph: NeuralSpeedGraph, model: dict, source: Path):
    """(Params, {field: value}): the file header's hyper-parameters in neural-speed's own Params (its
    writer lays them out), and the fields to set after it, as that graph's own converter writes them."""
    from neural_speed.convert import convert_llama as ne

    if graph.module == "llama":
        return ne.Params.loadHFTransformerJson(model, source / "config.json"), {}
    config = json.loads((source / "config.json").read_text())
    bos, eos = _header_token_ids(source, config)
    common = dict(n_embd=config["hidden_size"], n_head=config["num_attention_heads"], n_layer=config[graph.layers_key],
                  n_head_kv=0, rope_scale=1.0, bos_token_id=bos, eos_token_id=eos, pad_token_id=-1)
    if graph.module == "qwen":
        # its MLP halves (w1, w2) are intermediate_size / 2 wide; n_head_kv 0: every head has its own
        # keys and values. neural-speed 1.0 reads max_seq_len as a layout switch, not a limit (the
        # context is set at load): only 8192 gives the Qwen-1 layout (2048 and 16384 abort, measured).
        params = ne.Params(**common, n_vocab=config["vocab_size"], n_mult=config["intermediate_size"],
                           ffn_hidden_size=config["intermediate_size"] // 2, rms_norm_eps=config["layer_norm_epsilon"],
                           rope_theta=float(config.get("rotary_emb_base", 10000)))
        return params, {"max_seq_len": 8192}
    # chatglm2 (ChatGLM2/3): multi-query attention in groups; the graph derives its rotary size itself
    params = ne.Params(**common, n_vocab=config["padded_vocab_size"], n_mult=0,
                       ffn_hidden_size=config["ffn_hidden_size"], rms_norm_eps=config["layernorm_epsilon"],
                       rope_theta=10000.0)
    return params, {"n_rot": 0, "max_seq_len": config["seq_length"],
                    "multi_query_group_num": config["multi_query_group_num"]}


def _graph_tensors(graph: NeuralSpeedGraph, model: dict, params) -> dict:
    """The tensors in the graph's names and layout."""
    from neural_speed.convert import convert_llama as ne

    if graph.module == "llama":  # the library's own HF -> llama mapping (it permutes q/k for its rotary)
        return ne.do_necessary_conversions(model, params)
    # the other graphs keep the checkpoint's names; only weights and biases are tensors of the graph
    # (not, e.g., ChatGLM's stored rotary inv_freq)
    return {name: t for name, t in model.items() if name.endswith((".weight", ".bias"))}


def check_group_size(tensors: dict, group_size: int) -> None:
    """Refuse a group size that does not divide every weight row: neural-speed then quietly computes
    nonsense (measured: group 128 on the embedded model's 576-wide rows answers only end-of-text)."""
    if group_size <= 0:
        return
    for name, t in tensors.items():
        if len(t.shape) == 2 and t.shape[-1] % group_size:
            raise ValueError(f"int8.group_size {group_size} does not divide the {t.shape[-1]}-wide rows of {name}, "
                             f"and neural-speed gives wrong results then; use -1 (per channel) or a group size that "
                             f"divides every row width of this model")


def convert_f32(source: Path, out: Path, graph: NeuralSpeedGraph, trust_remote_code: bool,
                group_size: int = -1) -> dict:
    """Write the fp32 graph file; returns what the entry records about the layer padding.
    Tensors are read from the checkpoint one at a time (lazily), so memory stays near one tensor's size."""
    from neural_speed.convert import convert_llama as ne

    model = _load_checkpoint(source)
    if graph.output not in model:  # tie_word_embeddings: the output matrix is the embedding
        model[graph.output] = model[graph.embedding]
    params, fields = graph_header(graph, model, source)
    target = padded_layers(params.n_layer, graph.layer_counts)
    info = {"layers": params.n_layer, "graph_layers": target}
    if target > params.n_layer:
        log.info("padding %d layers with %d identity layers (the graph knows %s layers)", params.n_layer,
                 target - params.n_layer, "/".join(map(str, graph.layer_counts)))
        add_identity_layers(model, graph, params.n_layer, target)
        params.n_layer = target
    vocab = vocabulary(source, params.n_vocab, trust_remote_code)
    model = ne.convert_to_output_type(_graph_tensors(graph, model, params), ne.NEFileType.AllF32)
    check_group_size(model, group_size)
    check_disk(out.parent, model)
    ne.OutputFile.write_all(out, params, model, vocab, ne.NEFileType.AllF32)
    with open(out, "r+b") as f:
        for name, value in fields.items():
            f.seek(HEADER_OFFSETS[name])
            f.write(struct.pack("i", value))
    return info


def check_disk(folder: Path, tensors: dict) -> None:
    """Refuse before writing when the fp32 graph file and the INT8 file cannot both fit on `folder`'s disk."""
    import math
    import shutil

    f32 = sum(4 * math.prod(t.shape) for t in tensors.values())
    need = f32 * 1.3  # the INT8 file (about 1 byte per weight, plus its fp32 scales) is written beside it
    free = shutil.disk_usage(folder).free
    if need > free:
        raise NotEnoughRoom(
            f"converting to neural-speed needs about {need / 2**30:.1f} GiB of free disk in {folder} (its fp32 "
            f"graph file, deleted afterwards, and the INT8 file) and only {free / 2**30:.1f} GiB is free; free "
            f"some disk, or set models[].int8: {{runtime: qbits}}, which needs no fp32 copy")
    log.info("disk: converting needs about %.1f GiB, %.1f GiB free", need / 2**30, free / 2**30)


def quantize_and_save(source: Path, staging: Path, settings: dict, trust_remote_code: bool) -> None:
    import importlib

    from workers.engine.quantize_child import check_memory

    t0 = time.monotonic()
    graph, why = neural_speed_graph(json.loads((source / "config.json").read_text()))
    if graph is None:
        raise ValueError(f"neural-speed cannot quantize {source.name}: {why}")
    module = graph.module
    check_memory(source)
    # The fp32 intermediate (4 bytes per weight: 28 GB for a 7 B model) goes into the staging folder,
    # on the cache's disk rather than a tmpfs /tmp, and is deleted with it if anything fails.
    f32 = staging / "model-f32.bin.partial"
    log.info("[1/2] converting %s to neural-speed's %s graph file (fp32)", source.name, module)
    info = convert_f32(source, f32, graph, trust_remote_code, settings["group_size"])
    log.info("[2/2] quantizing to INT%d with neural-speed (%s)", settings.get("bits", 8), settings)
    cpp = importlib.import_module(f"neural_speed.{module}_cpp")
    cpp.Model.quant_model(model_path=str(f32), out_path=str(staging / WEIGHTS),
                          weight_dtype=WEIGHT_DTYPES[settings.get("bits", 8)],
                          alg="sym", group_size=settings["group_size"], scale_dtype=settings["scale_dtype"],
                          compute_dtype=settings["compute_dtype"], use_ggml=False)
    if not (staging / WEIGHTS).is_file():
        raise RuntimeError("neural-speed's quant_model wrote no file")
    # its embedding table came out in 4-bit GGML Q4_0 (ne_file): made INT8 (Q8_0) from the fp32 file,
    # read before that file is deleted, so the disk never holds more than the fp32 and INT8 files
    output = INT8_OUTPUT_AT_4_BITS.get(module) if settings.get("bits", 8) == 4 else None
    tables = ne_file.q4_0_tables_as_q8_0(f32, staging / WEIGHTS, (output,) if output else ())
    f32.unlink()
    ne_file.replace_tensors(staging / WEIGHTS, tables)
    log.info("kept in INT8 (GGML Q8_0; neural-speed wrote Q4_0 or INT4): %s", ", ".join(sorted(tables)) or "none")
    (staging / GRAPH_INFO).write_text(json.dumps({"module": module, **info, "settings": settings}, indent=2))
    log.info("quantized in %.0f s", time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    from workers.engine.quantize_child import quantizer_cli

    return quantizer_cli(quantize_and_save, "quantize one model into a neural-speed INT8 cache folder",
                         "the INT8 settings as JSON", argv)


if __name__ == "__main__":
    sys.exit(main())
