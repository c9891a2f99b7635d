"""Tiny random-weight ChatGLM3-6B / Qwen-7B-Chat folders and their own chat() as the reference.

The remote-code files, tokenizers, licences and shrunk configs come from `MODEL_CODE`
(`<project root>/../shared/model-code`, see its README). `build_chatglm3` / `build_qwen` write a
complete Hugging Face model folder (2 layers, hidden 128, real vocabularies) in the dtype the real
checkpoint ships: float16 for ChatGLM3, bfloat16 for Qwen. `reference_chat` loads such a folder in
true float32 and runs the model's OWN `chat()` greedily; that is what a server must reproduce token
for token. Only torch, transformers and the standard library are used.

Weights: every floating parameter is drawn from N(0, 0.02) with a `torch.Generator` seeded by
`seed` (in `named_parameters()` order), except the RMSNorm scales, which are set to 1 (with
N(0, 0.02) scales the logits would be ~1e-3 apart and greedy decoding would sit on near-ties).

`turn_end_after=N` (a "bigram chain"): the prompt built by either family's chat code always ends
with the same token t0 (ChatGLM3 `<|assistant|>` 64796; Qwen "\\n" 198 after "assistant"). We pick
N distinct ordinary tokens c1..cN (the first unique tokens of CHAIN_TEXT) and N+1 orthonormal
directions d0..dN (QR of a seeded Gaussian). The input embeddings of t0, c1..cN are set to
sqrt(hidden) * d_k (rms 1, i.e. ~50x the 0.02 noise), so the final RMSNorm output at a position
holding chain token k is ~sqrt(hidden) * d_k whatever the context (attention/MLP add only ~0.05
per unit). The output-layer rows of c_{k+1} (and of the turn-end token after cN) are set to d_k,
giving the intended next token a logit of ~sqrt(hidden) (~11) against ~1 for every other token.
So for ANY conversation (single/multi-turn, system prompt, any language) the greedy answer is
c1..cN followed by the turn-end token (ChatGLM3 `<|user|>` 64795, Qwen `<|im_end|>` 151645); the
margin (~10 logits) also survives float16/bfloat16/INT8. A stack that ignores the turn-end token
keeps generating after it; `model.chat()` stops there.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

ROOT = Path(__file__).resolve().parent.parent
MODEL_CODE = ROOT.parent / "shared" / "model-code"

CHATGLM3, QWEN = "chatglm3", "qwen"
INIT_STD = 0.02
CHAIN_TEXT = ("Hello from a tiny model that stops here and never says anything more because "
              "its turn is over now")
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."

# Stop tokens of each family's chat(), mapped to the `stopped_by` reason they give.
CHATGLM3_STOPS = {2: "eos", 64795: "turn_end", 64797: "turn_end"}          # </s>, <|user|>, <|observation|>
QWEN_STOPS = {151645: "turn_end", 151644: "turn_end", 151643: "eos"}       # <|im_end|>, <|im_start|>, <|endoftext|>
TURN_END_ID = {CHATGLM3: 64795, QWEN: 151645}
CHAIN_START_ID = {CHATGLM3: 64796, QWEN: 198}                              # last prompt token

_FILES = {
    CHATGLM3: ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py",
               "quantization.py", "tokenizer_config.json", "tokenizer.model", "MODEL_LICENSE"),
    QWEN: ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py",
           "cpp_kernels.py", "qwen.tiktoken", "tokenizer_config.json", "generation_config.json",
           "LICENSE", "NOTICE"),
}
_CHECKPOINT_DTYPE = {CHATGLM3: torch.float16, QWEN: torch.bfloat16}
_MODEL_CLASS = {CHATGLM3: "modeling_chatglm.ChatGLMForConditionalGeneration",
                QWEN: "modeling_qwen.QWenLMHeadModel"}
# (input embedding, output layer) parameter names
_EMB_OUT = {CHATGLM3: ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"),
            QWEN: ("transformer.wte.weight", "lm_head.weight")}


def model_code_missing() -> str | None:
    """A skip reason when the shared model code is not there, else None."""
    for family in (CHATGLM3, QWEN):
        folder = MODEL_CODE / family
        missing = [n for n in (*_FILES[family], "config.tiny.json") if not (folder / n).is_file()]
        if missing:
            return f"model code missing: {folder} lacks {', '.join(missing)}"
    return None


def family_of(folder: Path) -> str:
    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    if model_type == "chatglm":
        return CHATGLM3
    if model_type == "qwen":
        return QWEN
    raise ValueError(f"{folder}: model_type {model_type!r} is neither chatglm nor qwen")


# --------------------------------------------------------------------------------------- building

def build_chatglm3(target: Path, *, seed: int = 0, turn_end_after: int | None = None) -> Path:
    """A tiny ChatGLM3-6B folder (float16 safetensors) at `target`; returns `target`."""
    return _build(CHATGLM3, Path(target), seed, turn_end_after)


def build_qwen(target: Path, *, seed: int = 0, turn_end_after: int | None = None) -> Path:
    """A tiny Qwen-7B-Chat folder (bfloat16 safetensors) at `target`; returns `target`."""
    return _build(QWEN, Path(target), seed, turn_end_after)


def _build(family: str, target: Path, seed: int, turn_end_after: int | None) -> Path:
    from safetensors.torch import save_file

    reason = model_code_missing()
    if reason:
        raise FileNotFoundError(reason)
    source = MODEL_CODE / family
    target.mkdir(parents=True, exist_ok=True)
    for name in _FILES[family]:
        shutil.copyfile(source / name, target / name)   # copyfile: the sources are read-only
    config_text = (source / "config.tiny.json").read_text()
    assert "auto_map" in json.loads(config_text)
    (target / "config.json").write_text(config_text)

    config = AutoConfig.from_pretrained(target, trust_remote_code=True)
    if family == CHATGLM3:
        config.torch_dtype = torch.float32               # layers are built in config.torch_dtype
    else:
        config.fp32, config.fp16, config.bf16, config.use_flash_attn = True, False, False, False
    model_class = get_class_from_dynamic_module(_MODEL_CLASS[family], target)
    with torch.no_grad():
        model = model_class(config, empty_init=False) if family == CHATGLM3 else model_class(config)
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if _is_norm_scale(name):
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
        if turn_end_after is not None:
            _install_chain(family, target, model, turn_end_after, seed)
        dtype = _CHECKPOINT_DTYPE[family]
        state = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
                 for k, v in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _is_norm_scale(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return name.endswith(".weight") and any(k in leaf[-2] for k in ("layernorm", "ln_"))


def chain_token_ids(folder_or_family, n: int) -> list[int]:
    """The n ordinary tokens a `turn_end_after=n` model answers before its turn-end token."""
    family = folder_or_family if folder_or_family in (CHATGLM3, QWEN) else family_of(Path(folder_or_family))
    folder = MODEL_CODE / family if folder_or_family in (CHATGLM3, QWEN) else Path(folder_or_family)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer.tokenizer.encode(CHAIN_TEXT) if family == CHATGLM3 else tokenizer.encode(CHAIN_TEXT)
    unique = []
    for i in ids:
        if i not in unique and i != CHAIN_START_ID[family]:
            unique.append(i)
    if n > len(unique):
        raise ValueError(f"turn_end_after={n}: at most {len(unique)} for {family}")
    return unique[:n]


def _install_chain(family: str, folder: Path, model, n: int, seed: int) -> None:
    if n < 0:
        raise ValueError("turn_end_after must be >= 0")
    chain = chain_token_ids(folder, n)
    params = dict(model.named_parameters())
    emb_name, out_name = _EMB_OUT[family]
    emb, out = params[emb_name], params[out_name]
    hidden = emb.shape[1]
    generator = torch.Generator().manual_seed(10_000 + seed)
    directions, _ = torch.linalg.qr(torch.randn(hidden, n + 1, generator=generator))   # orthonormal columns
    current = [CHAIN_START_ID[family], *chain]
    following = [*chain, TURN_END_ID[family]]
    for k, (cur, nxt) in enumerate(zip(current, following)):
        emb[cur] = directions[:, k] * hidden ** 0.5
        out[nxt] = directions[:, k]


# ---------------------------------------------------------------------------------------- loading

def load_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with every floating parameter in `dtype` (float32: the reference)."""
    folder = Path(folder)
    family = family_of(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if family == CHATGLM3:
        config.torch_dtype = dtype
    else:   # Qwen picks its precision from fp32/fp16/bf16, not from torch_dtype
        config.fp32, config.fp16, config.bf16 = dtype == torch.float32, dtype == torch.float16, dtype == torch.bfloat16
        config.use_flash_attn = False
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True, torch_dtype=dtype)
    model = model.to(dtype).eval()
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype}
    assert not wrong, f"parameters not in {dtype}: {wrong}"
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return model, tokenizer


# ------------------------------------------------------------------------------------ chat inputs

def _split(messages: list[dict]) -> tuple[list[dict], str]:
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with a user message")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {m!r}")
    return messages[:-1], messages[-1]["content"]


def chatglm3_history(messages: list[dict]) -> tuple[str, list[dict]]:
    """(query, history) as ChatGLM3's chat()/build_chat_input expect them."""
    earlier, query = _split(messages)
    history = []
    for m in earlier:
        item = {"role": m["role"], "content": m["content"]}
        if m["role"] == "assistant":
            item["metadata"] = ""
        history.append(item)
    return query, history


def qwen_history(messages: list[dict]) -> tuple[str, list[tuple[str, str]], str]:
    """(query, [(user, assistant), ...], system) as Qwen's chat()/make_context expect them.

    No system message means Qwen's own default, "You are a helpful assistant.".
    """
    earlier, query = _split(messages)
    system = QWEN_DEFAULT_SYSTEM
    if earlier and earlier[0]["role"] == "system":
        system, earlier = earlier[0]["content"], earlier[1:]
    if len(earlier) % 2 or any(m["role"] != r for m, r in zip(earlier, ["user", "assistant"] * len(earlier))):
        raise ValueError("Qwen history must be: [system], then (user, assistant) pairs, then user")
    pairs = [(earlier[i]["content"], earlier[i + 1]["content"]) for i in range(0, len(earlier), 2)]
    return query, pairs, system


def _qwen_utils(folder_or_model):
    if isinstance(folder_or_model, (str, Path)):
        return get_class_from_dynamic_module("qwen_generation_utils.make_context", folder_or_model), None
    module = sys.modules[type(folder_or_model).__module__]   # modeling_qwen imports make_context
    return module.make_context, module


def _prompt(family: str, tokenizer, messages, make_context, max_window_size) -> tuple[list[int], str]:
    if family == CHATGLM3:
        query, history = chatglm3_history(messages)
        ids = tokenizer.build_chat_input(query, history=history, role="user")["input_ids"][0].tolist()
        return ids, tokenizer.decode(ids)
    query, pairs, system = qwen_history(messages)
    raw_text, ids = make_context(tokenizer, query, history=pairs, system=system,
                                 max_window_size=max_window_size, chat_format="chatml")
    return ids, raw_text


def reference_prompt_ids(folder: Path, messages: list[dict]) -> list[int]:
    """The prompt token ids the family's own chat() feeds to generate() for `messages`."""
    folder = Path(folder)
    family = family_of(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    make_context, window = None, None
    if family == QWEN:
        make_context, _ = _qwen_utils(folder)
        window = json.loads((folder / "generation_config.json").read_text())["max_window_size"]
    return _prompt(family, tokenizer, messages, make_context, window)[0]


# ------------------------------------------------------------------------------------------ chat

def reference_chat(folder: Path, messages: list[dict], *, max_new_tokens: int,
                   dtype: torch.dtype = torch.float32, repetition_penalty: float = 1.0) -> dict:
    """Load `folder` in `dtype` (float32 by default) and run its own chat() greedily (see chat_with_model)."""
    model, tokenizer = load_reference(folder, dtype)
    return chat_with_model(model, tokenizer, messages, max_new_tokens=max_new_tokens,
                           repetition_penalty=repetition_penalty)


def chat_with_model(model, tokenizer, messages: list[dict], *, max_new_tokens: int,
                    repetition_penalty: float = 1.0) -> dict:
    """Run an already loaded model's own chat() greedily (works for an ITREX INT8 model too).

    Returns {"text": chat()'s answer (after the family's post-processing; a dict for ChatGLM3 when
    the answer has "metadata\\n..."), "prompt_ids", "output_ids" (generated ids, stop tokens
    excluded), "stopped_by": "turn_end"|"eos"|"length", "stop_token_id", "raw_output_ids"
    (everything generate() appended, incl. the stop token and Qwen's forced <|endoftext|>),
    "decoded_ids" (the ids chat() decoded into "text"; one fewer than output_ids on "length": both
    chat()s drop the last token), "full_text" (the family's post-processing applied to all of
    output_ids: what a server returning max_new_tokens tokens should show), "prompt_text",
    "history", "family"}.
    """
    family = CHATGLM3 if model.config.model_type == "chatglm" else QWEN
    captured = {}
    had_own = "generate" in vars(model)
    original = model.generate

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["ids"] = (out.sequences if hasattr(out, "sequences") else out)[0].tolist()
        return out

    if family == CHATGLM3:
        prompt_ids, prompt_text = _prompt(family, tokenizer, messages, None, None)
        query, history = chatglm3_history(messages)
        model.generate = capture
        try:
            text, new_history = model.chat(tokenizer, query, history=history, do_sample=False,
                                           max_length=len(prompt_ids) + max_new_tokens,
                                           repetition_penalty=repetition_penalty)
        finally:
            _restore(model, had_own, original)
        stops = CHATGLM3_STOPS
    else:
        make_context, _ = _qwen_utils(model)
        gen_config = copy.deepcopy(model.generation_config)
        gen_config.do_sample, gen_config.top_k, gen_config.max_new_tokens = False, 1, max_new_tokens
        gen_config.repetition_penalty = repetition_penalty
        prompt_ids, prompt_text = _prompt(family, tokenizer, messages, make_context, gen_config.max_window_size)
        query, pairs, system = qwen_history(messages)
        model.generate = capture
        try:
            text, new_history = model.chat(tokenizer, query, history=pairs, system=system,
                                           generation_config=gen_config)
        finally:
            _restore(model, had_own, original)
        stops = QWEN_STOPS

    ids = captured["ids"]
    assert ids[:len(prompt_ids)] == prompt_ids, "chat() used a different prompt than computed"
    raw = ids[len(prompt_ids):]
    cut = next((i for i, t in enumerate(raw) if t in stops), None)
    output_ids = raw if cut is None else raw[:cut]
    stopped_by = "length" if cut is None else stops[raw[cut]]
    decoded_ids = output_ids[:-1] if cut is None else output_ids
    if family == CHATGLM3:
        full_text = model.process_response(tokenizer.decode(output_ids), chatglm3_history(messages)[1])[0]
    else:
        full_text = tokenizer.decode(output_ids, errors="replace").strip()
    return {"text": text, "prompt_ids": prompt_ids, "output_ids": output_ids, "stopped_by": stopped_by,
            "stop_token_id": None if cut is None else raw[cut], "raw_output_ids": raw,
            "decoded_ids": decoded_ids, "full_text": full_text, "prompt_text": prompt_text,
            "history": new_history, "family": family}


def _restore(model, had_own: bool, original) -> None:
    if had_own:
        model.generate = original
    else:
        del model.generate
