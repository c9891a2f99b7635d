"""What the bundle knows about each model family, in one place, keyed by what config.json says.

A family is recognised from config.json (`model_type`, `architectures`, the classes `auto_map`
names), never from the folder name. Each `Family` says how its own chat code builds a prompt,
which tokens end its turn, what its chat() does to the answer text, which config fixes it needs on
CPU, which tokenizer files its code loads, and the sampling values its chat() passes itself.

Choosing a family for a model (`resolve`):
1. a family below whose config keys match and whose tokenizer has the method its chat code calls
   (ChatGLM3 `build_chat_input`; ChatGLM2 and GLM-4 share model_type "chatglm" but not that code);
2. otherwise, a tokenizer with a `chat_template` (SmolLM2, Llama 3, Qwen2/2.5, Phi-3, Gemma, ...)
   renders through `apply_chat_template`: the `CHAT_TEMPLATE` family;
3. otherwise `UnknownFamily`, which asks for `models[].conv_template` (a FastChat template name).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # imported where used: the family data itself needs neither
    import torch
    from transformers import PretrainedConfig

# How a family's prompt is built (ChatFormat in workers/engine/prompt.py implements each):
PROMPT_CHAT_TEMPLATE = "chat_template"  # tokenizer.apply_chat_template(messages, add_generation_prompt=True)
PROMPT_CHATGLM3 = "chatglm3"            # tokenizer.build_chat_input(query, history, role="user")
PROMPT_QWEN_CHATML = "qwen_chatml"      # qwen_generation_utils.make_context(..., chat_format="chatml")

# How a family's code picks its precision (apply_cpu_overrides):
PRECISION_TORCH_DTYPE = "torch_dtype"   # from_pretrained's torch_dtype is enough (transformers' own models)
PRECISION_CONFIG_DTYPE = "config_dtype"  # its code builds layers in config.torch_dtype (ChatGLM3)
PRECISION_FLAGS = "flags"               # config.fp32 / bf16 / fp16 flags (Qwen-7B)

# How a family writes tool calls and reads tool results (workers/engine/tool_formats.py implements each):
TOOLS_CHATGLM3 = "chatglm3"        # tools as JSON in the system turn; a call is "<name>\n```python\ntool_call(k=v)\n```"
                                   # ending at <|observation|>; results come back as an <|observation|> turn (its chat())
TOOLS_QWEN_REACT = "qwen_react"    # Qwen-7B-Chat's ReAct prompt, as Qwen's own openai_api.py builds and parses it:
                                   # "Action: <name>\nAction Input: <JSON>", stopped at "Observation:"
TOOLS_HERMES = "hermes"            # <tool_call>{"name", "arguments"}</tool_call> (Qwen2.5/Qwen3, Hermes templates)
TOOLS_LLAMA3_JSON = "llama3_json"  # Llama 3.1: [<|python_tag|>]{"name", "parameters"} as the whole answer
# A chat template's tool format, told by a marker in its text (first match wins); a template that
# renders no tools gets TOOLS_HERMES: the tools and the call format are put in its system message.
TEMPLATE_TOOL_MARKERS = (("<tool_call>", TOOLS_HERMES), ("<|python_tag|>", TOOLS_LLAMA3_JSON))
QWEN_REACT_STOP = "Observation:"   # Qwen's openai_api.py adds it to the stop words when functions are given

# Turn-end tokens of common chat templates, stopped on when the template itself writes them.
TEMPLATE_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                      "<|user|>", "<|observation|>")


class UnknownFamily(ValueError):
    """The bundle knows no chat format for this model."""


@dataclass(frozen=True)
class Family:
    name: str
    prompt: str                                  # one of the PROMPT_* kinds
    # Recognised by any of these config.json values:
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    auto_map_classes: tuple[str, ...] = ()       # class names in config.json auto_map ("module.Class" -> "Class")
    # The tokenizer method its chat code calls; a config match without it is another family member.
    tokenizer_method: str | None = None
    default_system: str | None = None            # system prompt when the messages give none
    turn_end_tokens: tuple[str, ...] = ()        # tokens ending the assistant's turn (besides eos)
    postprocess: str = "none"                    # "none" | "strip" | "chatglm3" (see postprocess_text)
    plain_text_bos: bool | None = None           # None: as the chat template says (bos_token in it)
    # Its chat() decodes the answer ids with special tokens kept (stop tokens are cut off before).
    decode_skip_special_tokens: bool = True
    precision: str = PRECISION_TORCH_DTYPE
    cpu_config: tuple[tuple[str, Any], ...] = ()  # config attributes set before loading on CPU
    tokenizer_files: tuple[str, ...] = ()        # files its tokenizer code loads (completeness check)
    # Sampling values its own chat() passes to generate() itself (they win over generation_config).
    chat_sampling: tuple[tuple[str, float], ...] = ()
    # Can its forward pass extend a KV cache by several tokens at once (prefix reuse)? Qwen-7B's code
    # applies no causal mask when a cache is given, so a cache is extended one token at a time there.
    batched_continuation: bool = True
    # (batch axis, sequence axis) of its cached key/value tensors, for continuous batching (the batch
    # cache is padded and cut along them); None: its sequences are not batched.
    kv_axes: tuple[int, int] | None = (0, 2)
    # Submodule returning [cos, sin] tables (1, positions, 1, dim) for the cache length, when the
    # family's code takes rotary positions from there instead of from position ids (Qwen-7B).
    pad_shifted_rotary: str | None = None
    # Globals of the family's model code set while a batch with padding decodes (Qwen-7B's torch-2
    # attention path fails on a padding mask when decoding: it expands by a causal mask that is None).
    padded_decode_globals: tuple[tuple[str, Any], ...] = ()
    tool_format: str | None = None               # one of TOOLS_*; None: as its chat template says
    notes: str = field(default="", compare=False)

    def postprocess_text(self, text: str) -> str:
        """The text clean-up the family's own chat() applies to a decoded answer."""
        if self.postprocess == "strip":
            return text.strip()
        if self.postprocess == "chatglm3":
            return chatglm3_process_response(text)
        return text


CHATGLM3 = Family(
    name="chatglm3",
    prompt=PROMPT_CHATGLM3,
    model_types=("chatglm",),
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    auto_map_classes=("ChatGLMForConditionalGeneration", "ChatGLMModel"),
    tokenizer_method="build_chat_input",
    turn_end_tokens=("<|user|>", "<|observation|>"),
    postprocess="chatglm3",
    plain_text_bos=False,  # its tokenizer itself starts every encoded text with [gMASK] sop
    decode_skip_special_tokens=False,  # chat(): tokenizer.decode(ids) (its role tokens are no HF specials anyway)
    precision=PRECISION_CONFIG_DTYPE,
    tokenizer_files=("tokenizer.model", "tokenizer_config.json"),
    chat_sampling=(("temperature", 0.8), ("top_p", 0.8)),  # chat(..., do_sample=True, top_p=0.8, temperature=0.8)
    kv_axes=(1, 0),  # its cache is (seq, batch, groups, dim); it takes position ids and a padding mask
    tool_format=TOOLS_CHATGLM3,
    notes="chat(): eos 2, <|user|> 64795, <|observation|> 64797; decode(out[:-1]) then process_response",
)

QWEN = Family(
    name="qwen",
    prompt=PROMPT_QWEN_CHATML,
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    auto_map_classes=("QWenLMHeadModel",),
    default_system="You are a helpful assistant.",
    turn_end_tokens=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
    postprocess="strip",
    plain_text_bos=False,
    decode_skip_special_tokens=False,  # chat() keeps <|extra_N|>; skip_special_tokens=True would drop them
    precision=PRECISION_FLAGS,
    # Its code picks half precision from config.fp16/bf16 (FastChat's Qwen adapter forces fp16), which
    # fails on CPU ("addmm_impl_cpu_ not implemented for 'Half'"); flash-attn does not exist on CPU.
    cpu_config=(("use_flash_attn", False),),
    tokenizer_files=("qwen.tiktoken", "tokenizer_config.json"),
    batched_continuation=False,  # attention: causal_mask only "if query.size(1) == key_size"
    kv_axes=(0, 1),  # its cache is (batch, seq, heads, dim)
    # It takes rotary positions from the cache length, not from position ids: in a left-padded batch
    # this module's cos/sin tables are shifted back per row by its padding.
    pad_shifted_rotary="transformer.rotary_emb",
    padded_decode_globals=(("SUPPORT_TORCH2", False),),  # its own _attn() adds the padding mask
    tool_format=TOOLS_QWEN_REACT,
    notes="chat(): stop words <|im_end|>/<|im_start|> then a forced <|endoftext|>; decode(errors='replace').strip()",
)

# Any model whose tokenizer has a chat_template and that no family above claims.
CHAT_TEMPLATE = Family(name="chat_template", prompt=PROMPT_CHAT_TEMPLATE)

FAMILIES: tuple[Family, ...] = (CHATGLM3, QWEN)

# ---------------------------------------------------------------------------------- reasoning

@dataclass(frozen=True)
class ReasoningMarkers:
    """How a reasoning model marks its thinking before the answer (workers/engine/reasoning.py splits it).

    A model uses these markers when its config.json model_type is one of `model_types`, its tokenizer
    has both markers as single tokens and its chat template writes the opening one: the same
    model_type also names models that do not reason (Qwen2.5 and the R1-Distill-Qwen models are both
    "qwen2"; their tokenizers and templates tell them apart). Whether the template opens the thinking
    block in the prompt itself is read from each request's prompt (the R1 distills always do; Qwen3
    leaves it to the model, and closes an empty block when `enable_thinking` is false).
    """

    start: str
    end: str
    model_types: tuple[str, ...]
    notes: str = field(default="", compare=False)


REASONING_MARKERS: tuple[ReasoningMarkers, ...] = (
    ReasoningMarkers(
        start="<think>", end="</think>",
        # qwen3, qwen3_moe: Qwen3 dense and MoE (<think> 151667, </think> 151668); qwen2: DeepSeek-R1-Distill-Qwen
        # and QwQ (151648/151649); llama: DeepSeek-R1-Distill-Llama (128013/128014); smollm3: SmolLM3 (128002/128003)
        model_types=("qwen3", "qwen3_moe", "qwen2", "llama", "smollm3"),
        notes="R1 distills: the template ends with '<｜Assistant｜><think>\\n'; Qwen3: '<think>\\n\\n</think>\\n\\n' "
              "when enable_thinking is false; SmolLM3: an empty block unless reasoning mode is /think",
    ),
)


def reasoning_markers(config: Mapping | PretrainedConfig, has_token, template: str) -> ReasoningMarkers | None:
    """The reasoning markers this model writes, or None. `has_token(text)`: the tokenizer has it as one
    token; `template`: its chat template text ("" without one)."""
    model_type = _get(config, "model_type")
    for markers in REASONING_MARKERS:
        if (model_type in markers.model_types and markers.start in template
                and has_token(markers.start) and has_token(markers.end)):
            return markers
    return None


# ------------------------------------------------------------------------ files and ModelScope ids

@dataclass(frozen=True)
class ModelFiles:
    """What a model folder of these model_types needs besides config.json and its weights (the
    completeness check, workers/models/check.py): tokenizer files, each group a set of alternatives
    of which one must be there, and a chat template (tokenizer_config.json's `chat_template`, or the
    chat_template.jinja / chat_template.json files newer transformers versions write)."""

    model_types: tuple[str, ...]
    tokenizer: tuple[tuple[str, ...], ...]
    chat_template: bool = True


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_FAST_TOKENIZER = (("tokenizer_config.json",), ("tokenizer.json",))
_FAST_OR_SENTENCEPIECE = (("tokenizer_config.json",), ("tokenizer.json", "tokenizer.model"))

MODEL_FILES: tuple[ModelFiles, ...] = (
    # byte-level BPE with its tokenizer.json (Qwen2.5/Qwen3/R1-Distill-Qwen also ship vocab.json + merges.txt)
    ModelFiles(("qwen2", "qwen3", "qwen3_moe", "llama", "glm", "glm4", "smollm3"), _FAST_TOKENIZER),
    # sentencepiece families: tokenizer.model, and tokenizer.json in their current repositories
    ModelFiles(("phi3", "gemma", "gemma2", "gemma3", "gemma3_text", "mistral"), _FAST_OR_SENTENCEPIECE),
)


def model_files(config: Mapping | PretrainedConfig) -> ModelFiles | None:
    model_type = _get(config, "model_type")
    return next((f for f in MODEL_FILES if model_type in f.model_types), None)


@dataclass(frozen=True)
class KnownModel:
    """A ModelScope repository the bundle knows, and the config.json model_type its folder must have."""

    modelscope: str
    model_type: str
    notes: str = field(default="", compare=False)


# Ids checked against ModelScope references on 2026-12-06 (docs/models.md, 'Today's models from ModelScope', says how).
KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("ZhipuAI/chatglm3-6b", "chatglm", "seed model"),
    KnownModel("qwen/Qwen-7B-Chat", "qwen", "seed model"),
    KnownModel("Qwen/Qwen3-8B", "qwen3", "thinks: <think> ... </think>; enable_thinking switch"),
    KnownModel("Qwen/Qwen3-4B", "qwen3"),
    KnownModel("Qwen/Qwen3-1.7B", "qwen3"),
    KnownModel("Qwen/Qwen3-0.6B", "qwen3"),
    KnownModel("Qwen/Qwen3-30B-A3B", "qwen3_moe", "mixture of experts, thinks like Qwen3; all 128 experts stay in "
               "memory: INT8 needs about 33 GiB, more than a 24 GiB host"),
    KnownModel("Qwen/Qwen2.5-7B-Instruct", "qwen2"),
    KnownModel("Qwen/Qwen2.5-3B-Instruct", "qwen2"),
    KnownModel("Qwen/Qwen2.5-1.5B-Instruct", "qwen2"),
    KnownModel("LLM-Research/Meta-Llama-3.1-8B-Instruct", "llama"),
    KnownModel("LLM-Research/Llama-3.2-3B-Instruct", "llama"),
    KnownModel("LLM-Research/Llama-3.2-1B-Instruct", "llama"),
    KnownModel("LLM-Research/Llama-3.3-70B-Instruct", "llama", "too large for one 24 GiB host"),
    KnownModel("LLM-Research/Phi-3.5-mini-instruct", "phi3"),
    KnownModel("LLM-Research/phi-4", "phi3"),
    KnownModel("LLM-Research/gemma-2-9b-it", "gemma2"),
    KnownModel("LLM-Research/gemma-2-2b-it", "gemma2"),
    KnownModel("LLM-Research/gemma-3-1b-it", "gemma3_text"),
    KnownModel("LLM-Research/gemma-3-4b-it", "gemma3", "image-text model; the bundle serves its text"),
    KnownModel("ZhipuAI/glm-4-9b-chat-hf", "glm"),
    KnownModel("ZhipuAI/GLM-4-9B-0414", "glm4"),
    KnownModel("HuggingFaceTB/SmolLM3-3B", "smollm3", "thinks unless the system prompt says /no_think"),
    KnownModel("LLM-Research/Mistral-7B-Instruct-v0.3", "mistral"),
    KnownModel("mistralai/Ministral-8B-Instruct-2410", "mistral"),
    KnownModel("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", "thinks; its template opens <think>"),
    KnownModel("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2", "thinks; its template opens <think>"),
    KnownModel("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama", "thinks; its template opens <think>"),
    KnownModel("deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "qwen3", "thinks"),
)


def known_model(modelscope_id: str) -> KnownModel | None:
    """The known repository of this id (ModelScope ids are case-insensitive: qwen/ and Qwen/ are one)."""
    wanted = modelscope_id.lower()
    return next((m for m in KNOWN_MODELS if m.modelscope.lower() == wanted), None)


@dataclass(frozen=True)
class NeuralSpeedGraph:
    """A model architecture neural-speed (ITREX's own CPU runtime) has a graph for, and what it needs.

    Measured with neural-speed 1.0: its graphs size their scratch buffers by layer count and abort on
    any count not in their table, so a model with fewer layers is padded with identity layers (all
    weights zero: each adds nothing to the residual stream) up to the next count the graph knows.
    """

    module: str                                   # neural_speed.<module>_cpp
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layer_counts: tuple[int, ...]                 # the graph's scratch table (llama.h: 32 40 60 80)
    # config.json values the graph assumes (anything else is computed differently there); a key
    # missing from config.json meets its requirement unless it is also in `present`
    requires: tuple[tuple[str, Any], ...] = ()
    present: tuple[str, ...] = ()
    # checkpoint names the converter needs: layer i's tensors start with f"{layer_prefix}{i}.", a tied
    # output matrix is a copy of `embedding`, an identity layer's norm scales (names with `norm_marker`) are one
    layer_prefix: str = "model.layers."
    embedding: str = "model.embed_tokens.weight"
    output: str = "lm_head.weight"
    norm_marker: str = "norm"
    layers_key: str = "num_hidden_layers"        # config.json's layer count
    # the graph evaluates only sequences whose first token is the file header's BOS id
    bos_first: bool = True
    # the graph can give every position's logits (perplexity); chatglm2 computes only the last one's
    all_logits: bool = True
    # the graph evaluates several sequences in one call, each at its own position, new prompts beside
    # decoding rows (neural-speed 1.0 does so for its llama and gptj graphs only: cont_batching_model_archs)
    continuous_batching: bool = False


NEURAL_SPEED_GRAPHS: tuple[NeuralSpeedGraph, ...] = (
    NeuralSpeedGraph(
        module="llama", model_types=("llama",), architectures=("LlamaForCausalLM",), layer_counts=(32, 40, 60, 80),
        requires=(("hidden_act", "silu"), ("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False)),
        continuous_batching=True,
    ),
    # Qwen-7B/14B (remote code). Its graph has no c_proj bias and rotates every head dimension;
    # dynamic NTK and logn attention act only past seq_length (8192), beyond the served context.
    # Measured with neural-speed 1.0: any first token works.
    NeuralSpeedGraph(
        module="qwen", model_types=("qwen",), architectures=("QWenLMHeadModel",), layer_counts=(24, 28, 32, 40, 80),
        requires=(("no_bias", True), ("rotary_pct", 1.0)),
        layer_prefix="transformer.h.", embedding="transformer.wte.weight", norm_marker="ln_", bos_first=False,
    ),
    # ChatGLM2/3-6B: multi-query attention, RMSNorm, a qkv bias and no other, half of each head rotated.
    # Its graph knows only 28 layers (chatglm2.h) and, asked for all logits, returns the last position's
    # followed by whatever memory follows it (measured with neural-speed 1.0).
    NeuralSpeedGraph(
        module="chatglm2", model_types=("chatglm",), architectures=("ChatGLMModel",), layer_counts=(28,),
        requires=(("multi_query_attention", True), ("rmsnorm", True), ("add_qkv_bias", True),
                  ("add_bias_linear", False), ("apply_residual_connection_post_layernorm", False),
                  ("original_rope", True), ("post_layer_norm", True), ("pre_seq_len", None), ("rope_ratio", None)),
        present=("multi_query_attention", "rmsnorm", "original_rope"),  # ChatGLM-6B (v1) has none of them
        layer_prefix="transformer.encoder.layers.", embedding="transformer.embedding.word_embeddings.weight",
        output="transformer.output_layer.weight", norm_marker="layernorm", layers_key="num_layers", bos_first=False,
        all_logits=False,
    ),
)


def neural_speed_graph(config: Mapping | PretrainedConfig) -> tuple[NeuralSpeedGraph | None, str]:
    """The neural-speed graph for this config.json, or None and why there is none."""
    model_type = _get(config, "model_type")
    architectures = set(_get(config, "architectures") or ())
    for graph in NEURAL_SPEED_GRAPHS:
        if model_type in graph.model_types and architectures <= set(graph.architectures):
            for key, value in graph.requires:
                if key in graph.present and _get(config, key, _MISSING) is _MISSING:
                    return None, f"it has no {key}; neural-speed's {graph.module} graph assumes {value!r}"
                if _get(config, key, value) != value:
                    return None, f"its {key} is {_get(config, key)!r}; neural-speed's {graph.module} graph assumes {value!r}"
            if _get(config, graph.layers_key, 0) > max(graph.layer_counts):
                return None, f"neural-speed's {graph.module} graph takes at most {max(graph.layer_counts)} layers"
            return graph, ""
    return None, f"neural-speed has no graph the bundle uses for model_type {model_type!r}"


# ---------------------------------------------------------------------------------- environments

@dataclass(frozen=True)
class NewerTransformers:
    """Model types, or a config.json setting of them, that the pinned transformers (4.40.2) cannot run
    (it refuses the config, ignores the setting, or does not know the model type): their worker runs
    in the environment with a newer transformers (workers/config/environments.py)."""

    since: str                               # the first transformers release that runs it
    model_types: tuple[str, ...]
    setting: str = ""                        # what in config.json; "" for the model type itself
    applies: Any = None                      # config -> bool for a setting; None for the model type


def _rope_type(config) -> str | None:
    scaling = _get(config, "rope_scaling") or {}
    return scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, Mapping) else None


def _own_head_dim(config) -> bool:
    head_dim, hidden, heads = _get(config, "head_dim"), _get(config, "hidden_size"), _get(config, "num_attention_heads")
    return bool(head_dim and hidden and heads and head_dim * heads != hidden)


NEWER_TRANSFORMERS: tuple[NewerTransformers, ...] = (
    NewerTransformers("4.43", ("llama",), "rope_scaling rope_type llama3 (Llama 3.1 and later)",
                      lambda c: _rope_type(c) == "llama3"),
    NewerTransformers("4.43", ("llama", "mistral", "qwen2"), "head_dim other than hidden_size / num_attention_heads "
                      "(Mistral-Nemo)", _own_head_dim),
    NewerTransformers("4.41", ("llama",), "mlp_bias: true", lambda c: bool(_get(c, "mlp_bias"))),
    NewerTransformers("4.41", ("phi3",)),            # Phi-3.5 longrope 4.43, Phi-4-mini partial rotary 4.49
    NewerTransformers("4.42", ("gemma2",)),
    NewerTransformers("4.46", ("glm",)),             # glm-4-9b-chat-hf
    NewerTransformers("4.50", ("gemma3_text",)),
    NewerTransformers("4.51", ("qwen3", "qwen3_moe")),
    NewerTransformers("4.51.3", ("glm4",)),          # GLM-4-0414
    NewerTransformers("4.53", ("smollm3",)),
)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def newer_transformers_needed(config: Mapping | PretrainedConfig) -> tuple[str, str] | None:
    """(the transformers version this config needs, why) when it is newer than the pinned one, else None.

    From NEWER_TRANSFORMERS; a model type none of it names and the pinned transformers does not know
    needs a newer one too (its release is not recorded: the newest environment is tried).
    """
    from workers.config.environments import PINNED

    model_type = _get(config, "model_type")
    needs = [(r.since, f"its {r.setting}" if r.setting else f"model_type {model_type!r}")
             for r in NEWER_TRANSFORMERS if model_type in r.model_types and (r.applies is None or r.applies(config))]
    if needs:
        return max(needs, key=lambda n: _version_tuple(n[0]))
    if _get(config, "auto_map") or not model_type or model_type in pinned_model_types():
        return None
    return "", f"model_type {model_type!r} (unknown to transformers {PINNED.transformers})"


def pinned_model_types() -> frozenset[str]:
    """The model types the pinned environment's transformers knows."""
    return _pinned_model_types()


_PINNED_TYPES: frozenset[str] | None = None


def _pinned_model_types() -> frozenset[str]:
    global _PINNED_TYPES
    if _PINNED_TYPES is None:
        import subprocess

        from workers.config.environments import PINNED

        code = ("import json; from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES as m; "
                "print(json.dumps(sorted(m)))")
        if PINNED.is_this_process():
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

            _PINNED_TYPES = frozenset(CONFIG_MAPPING_NAMES)
        else:
            out = subprocess.run([PINNED.python(), "-c", code], capture_output=True, text=True, check=True)
            _PINNED_TYPES = frozenset(json.loads(out.stdout))
    return _PINNED_TYPES


def environment_for(config: Mapping | PretrainedConfig):
    """(the Python environment a worker for this config.json runs in, why).

    The pinned one unless the model needs a newer transformers (`newer_transformers_needed`); remote-code
    models (ChatGLM3-6B, Qwen-7B-Chat) stay pinned: their code breaks on newer transformers.
    """
    from workers.config.environments import ENVIRONMENTS, PINNED

    need = newer_transformers_needed(config)
    if need is None:
        return PINNED, f"transformers {PINNED.transformers} runs it"
    since, why = need
    for env in ENVIRONMENTS:
        if since and _version_tuple(env.transformers) >= _version_tuple(since):
            return env, f"{why} needs transformers >= {since}"
    newest = ENVIRONMENTS[-1]
    return newest, f"{why}: the newest environment (transformers {newest.transformers}) is tried"


NEUTRAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}


# ------------------------------------------------------------------------------------- choosing

_MISSING = object()


def _get(config: Mapping | PretrainedConfig, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _auto_map_class_names(config) -> set[str]:
    names = set()
    for ref in (_get(config, "auto_map") or {}).values():
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(item, str) and item:
                names.add(item.split("--")[-1].rsplit(".", 1)[-1])
    return names


def family_for_config(config: Mapping | PretrainedConfig) -> Family | None:
    """The family config.json names (model_type, architectures, auto_map), or None.

    Config only: ChatGLM2/GLM-4 folders also match CHATGLM3 here (`resolve` tells them apart by their
    tokenizer). Used where no tokenizer is loaded (the completeness check, config overrides).
    """
    model_type = _get(config, "model_type")
    architectures = set(_get(config, "architectures") or ())
    classes = _auto_map_class_names(config)
    for family in FAMILIES:
        if (model_type in family.model_types or architectures & set(family.architectures)
                or classes & set(family.auto_map_classes)):
            return family
    return None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve(config: Mapping | PretrainedConfig, tokenizer) -> Family:
    """The family whose chat format the model gets (see the module docstring for the order)."""
    family = family_for_config(config)
    if family is not None and (family.tokenizer_method is None or hasattr(tokenizer, family.tokenizer_method)):
        return family
    if has_chat_template(tokenizer):
        return CHAT_TEMPLATE
    model_type = _get(config, "model_type")
    architectures = ", ".join(_get(config, "architectures") or ()) or "none"
    raise UnknownFamily(
        f"no chat format known for model_type {model_type!r} (architectures: {architectures}): its tokenizer "
        f"has no chat_template and it is not one of the families the bundle knows "
        f"({', '.join(f.name for f in FAMILIES)}); set models[].conv_template to a FastChat conversation "
        f"template name (e.g. conv_template: chatglm2)"
    )


# -------------------------------------------------------------------------------- post-processing

def chatglm3_process_response(output: str) -> str:
    """The text ChatGLM3's `process_response` makes of a decoded answer, as a string.

    Only the part after the last "<|assistant|>" counts; its first line is metadata. With empty
    metadata the content is stripped and "[[训练时间]]" becomes "2023年" (what chat() returns). With a
    non-empty metadata line chat() returns a dict {"name": metadata, "content": ...} (a tool call);
    a text answer cannot be a dict, so that part is returned unchanged ("metadata\\ncontent").
    """
    part = output.split("<|assistant|>")[-1]
    metadata, content = part.split("\n", 1) if "\n" in part else ("", part)
    if metadata.strip():
        return part
    return content.strip().replace("[[训练时间]]", "2023年")


# --------------------------------------------------------------------------------- CPU overrides

def prepare_cpu_config(source: Path, trust_remote_code: bool, dtype: torch.dtype | None = None) -> PretrainedConfig:
    """The model's config with the CPU overrides its family needs (see apply_cpu_overrides)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    return apply_cpu_overrides(config, dtype)


def apply_cpu_overrides(config: PretrainedConfig, dtype: torch.dtype | None = None) -> PretrainedConfig:
    """Set what the family needs on CPU; with `dtype`, make its code build every layer in that dtype.

    ChatGLM3 builds its layers in config.torch_dtype (float16 as shipped), Qwen picks fp32/bf16/fp16
    from its config flags (fp16 in some revisions); without `dtype` Qwen gets fp32 flags (its half
    precision does not run on CPU) and ChatGLM3 keeps its checkpoint dtype.
    """
    import torch

    family = family_for_config(config)
    if family is None:
        return config
    for key, value in family.cpu_config:
        setattr(config, key, value)
    if family.precision == PRECISION_FLAGS:
        want = dtype or torch.float32
        config.fp32, config.bf16, config.fp16 = (want == torch.float32, want == torch.bfloat16, want == torch.float16)
    elif family.precision == PRECISION_CONFIG_DTYPE and dtype is not None:
        config.torch_dtype = dtype
    return config


# ------------------------------------------------------------------------------------ sampling

def read_json(path: Path) -> dict:
    """A JSON file as a dict; {} when it is absent or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
