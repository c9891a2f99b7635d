"""ChatGLM3-6B and Qwen-7B-Chat: everything that can be proven without their weights."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import ROOT, bundle_env, free_port, snapshot_for
from workers.config import deployment
from workers.models import memory_budget, check as model_check
from workers.models.memory_budget import GIB, Need, shape_from_config

from fastchat.conversation import get_conv_template

# config.json values of the ModelScope repositories (ZhipuAI/chatglm3-6b, qwen/Qwen-7B-Chat) and the
# total_size of their safetensors weight index: the real parameter counts (6.24 B and 7.72 B).
CHATGLM3_CONFIG = {
    "model_type": "chatglm", "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "kv_channels": 128,
    "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 65024, "ffn_hidden_size": 13696,
    "seq_length": 8192, "torch_dtype": "float16",
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}
CHATGLM3_TOTAL_BYTES = 12_487_168_064
QWEN_CONFIG = {
    "model_type": "qwen", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "kv_channels": 128,
    "vocab_size": 151936, "intermediate_size": 22016, "seq_length": 8192, "bf16": False, "fp16": False, "fp32": False,
    "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
}
QWEN_TOTAL_BYTES = 15_442_649_088


# --- profile ----------------------------------------------------------------------------------

def test_seed_profile():
    dep = deployment.load("seed", cpu_count=2)
    by_name = {m.program: m for m in dep.models}
    assert by_name["chatglm3-6b"].source.modelscope == "ZhipuAI/chatglm3-6b"
    assert by_name["qwen-7b-chat"].source.modelscope == "qwen/Qwen-7B-Chat"
    assert all(m.backend == "itrex-int8" and m.trust_remote_code for m in dep.models)
    assert sum(m.threads for m in dep.models) <= 2 and {tuple(m.cpu_cores) for m in dep.models} == {(0,), (1,)}


# --- download and completeness --------------------------------------------------------------------

def run_download(tmp_path, **env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("bundle")), "download", "--profile", "seed"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env=bundle_env(BUNDLE_VAR_DIR=str(tmp_path), **env))
    return proc, time.monotonic() - t0


def test_download_without_network_fails_at_once_with_a_clear_message(tmp_path):
    proc, elapsed = run_download(tmp_path, BUNDLE_MODELSCOPE_HOST="127.0.0.1")  # nothing listens on 443
    assert proc.returncode == 1
    assert "cannot reach ModelScope (127.0.0.1:443)" in proc.stderr and "path:" in proc.stderr
    assert elapsed < 60  # no retry loop (the timeout is 5 s)


def test_download_against_the_real_host_does_not_hang(tmp_path):
    proc, elapsed = run_download(tmp_path)  # this machine has no route to ModelScope
    assert proc.returncode == 1 and "cannot reach ModelScope" in proc.stderr, proc.stderr[-500:]
    assert "chatglm3-6b: ZhipuAI/chatglm3-6b ->" in proc.stdout


def make_folder(root: Path, config: dict, tokenizer_files: list[str], code: list[str], shards: int = 2) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [code[-1].removesuffix(".py") + ".Tok", None]}}))
    for name in tokenizer_files + code:
        (root / name).write_text("# stand-in\n")
    weight_map = {}
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({f"layer{i}.weight": torch.zeros(64, 64)}, str(root / name))
        weight_map[f"layer{i}.weight"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return root


@pytest.fixture
def qwen_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "Qwen-7B-Chat", QWEN_CONFIG, ["qwen.tiktoken"],
                       ["configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py"])


@pytest.fixture
def chatglm_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "chatglm3-6b", CHATGLM3_CONFIG, ["tokenizer.model"],
                       ["configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"])


def test_complete_folders_pass(qwen_folder, chatglm_folder):
    assert model_check.problems(qwen_folder) == []
    assert model_check.problems(chatglm_folder) == []


def test_missing_shard_is_named(qwen_folder):
    (qwen_folder / "model-00002-of-00002.safetensors").unlink()
    assert model_check.problems(qwen_folder) == ["weight shard model-00002-of-00002.safetensors is missing"]


def test_missing_qwen_tiktoken_is_named(qwen_folder):
    (qwen_folder / "qwen.tiktoken").unlink()
    assert model_check.problems(qwen_folder) == ["tokenizer file qwen.tiktoken is missing (needed by qwen models)"]


def test_missing_chatglm_tokenizer_model_and_remote_code_are_named(chatglm_folder):
    (chatglm_folder / "tokenizer.model").unlink()
    (chatglm_folder / "modeling_chatglm.py").unlink()
    assert model_check.problems(chatglm_folder) == [
        "tokenizer file tokenizer.model is missing (needed by chatglm models)",
        "remote-code file modeling_chatglm.py is missing (named in auto_map)",
    ]


def test_truncated_shard_is_named(qwen_folder):
    shard = qwen_folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    [problem] = model_check.problems(qwen_folder)
    assert problem.startswith("weight shard model-00001-of-00002.safetensors is incomplete or corrupt")


def test_worker_refuses_an_incomplete_local_folder(qwen_folder, tmp_path):
    (qwen_folder / "qwen.tiktoken").unlink()
    snap, _ = snapshot_for(tmp_path, [{"names": ["q"], "source": {"path": str(qwen_folder)}, "port": free_port(),
                                       "trust_remote_code": True}])
    proc = subprocess.run([sys.executable, "-m", "workers.serving.worker", "--deployment", str(snap), "--model", "q"],
                          cwd=ROOT, env=bundle_env(LOGDIR=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "qwen.tiktoken is missing" in proc.stdout + proc.stderr


# --- templates, generation path, dtype, stop tokens ---------------------------------------------

def qwen_make_context_text(query: str, history: list[tuple[str, str]], system: str = "You are a helpful assistant.") -> str:
    """raw_text of make_context(chat_format="chatml") in Qwen-7B-Chat's qwen_generation_utils.py."""
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    raw = f"{im_start}system\n{system}{im_end}"
    for q, a in history:
        raw += f"\n{im_start}user\n{q}{im_end}\n{im_start}assistant\n{a}{im_end}"
    return raw + f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"


CHATS = {
    "single": ([], "你好，请介绍一下你自己。"),
    "multi": ([("What is 2+2?", "4."), ("和 3 呢？", "2+3=5。")], "Now 10*10?"),
}


def fastchat_prompt(template: str, history, query, system: str | None = None) -> str:
    conv = get_conv_template(template)
    if system is not None:
        conv.set_system_message(system)
    for q, a in history:
        conv.append_message(conv.roles[0], q)
        conv.append_message(conv.roles[1], a)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_qwen_prompt_equals_qwens_own_chatml(chat):
    history, query = chat
    assert fastchat_prompt("qwen-7b-chat", history, query) == qwen_make_context_text(query, history)
    assert fastchat_prompt("qwen-7b-chat", history, query, system="Be brief.") == qwen_make_context_text(query, history, "Be brief.")


def test_qwen_cpu_dtype_override():
    from transformers import PretrainedConfig

    from workers.models.families import apply_cpu_overrides

    config = PretrainedConfig(**{k: v for k, v in QWEN_CONFIG.items() if k != "auto_map"})
    config.fp16 = True  # what FastChat's Qwen adapter would force
    apply_cpu_overrides(config)
    assert (config.fp16, config.bf16, config.fp32, config.use_flash_attn) == (False, False, True, False)


def test_user_stop_keeps_qwen_default_stop_tokens(monkeypatch):
    from fastchat.serve import openai_api_server as api

    async def qwen_conv(model_name, worker_addr):
        conv = get_conv_template("qwen-7b-chat")
        return {"name": conv.name, "system_template": conv.system_template, "system_message": conv.system_message,
                "roles": conv.roles, "messages": [], "offset": 0, "sep_style": int(conv.sep_style), "sep": conv.sep,
                "sep2": conv.sep2, "stop_str": conv.stop_str, "stop_token_ids": conv.stop_token_ids}

    monkeypatch.setattr(api, "get_conv", qwen_conv)
    params = asyncio.run(api.get_gen_params("qwen-7b-chat", "http://unused", [{"role": "user", "content": "hi"}],
                                            temperature=0, top_p=1, top_k=-1, presence_penalty=0, frequency_penalty=0,
                                            max_tokens=10, echo=False, logprobs=None, stop=["zebra"]))
    assert set(params["stop"]) == {"zebra", "<|endoftext|>"}
    assert params["stop_token_ids"] == [151643, 151644, 151645]


# --- memory budget -------------------------------------------------------------------------------

CHATGLM3 = shape_from_config(CHATGLM3_CONFIG, CHATGLM3_TOTAL_BYTES)
QWEN = shape_from_config(QWEN_CONFIG, QWEN_TOTAL_BYTES)


def test_real_parameter_counts():
    assert CHATGLM3.params == 6_243_584_032 and QWEN.params == 7_721_324_544
    assert QWEN.embedding == QWEN.output == 151936 * 4096


def test_both_seed_models_in_int8_fit_in_24_gib():
    # As conf/seed.yaml configures them: concurrency and prefix cache included.
    shapes = {"chatglm3-6b": CHATGLM3, "qwen-7b-chat": QWEN}
    needs = [Need(m.program, m.backend, shapes[m.program], m.limit_concurrency, m.int8.group_size,
                  m.prefix_cache_tokens) for m in deployment.load("seed", cpu_count=2).models]
    assert [n.prefix_cache_tokens for n in needs] == [4096, 512]
    assert memory_budget.check(needs, 24 * GIB) is None
    assert 7 * GIB < needs[0].bytes < 10 * GIB and 11 * GIB < needs[1].bytes < 14 * GIB


def test_first_start_quantization_of_each_seed_model_fits_in_24_gib():
    # start_all.sh quantizes one model at a time before any worker runs, so each peak alone must fit.
    chatglm3, qwen = memory_budget.quantize_peak_bytes(CHATGLM3), memory_budget.quantize_peak_bytes(QWEN)
    assert 8 * GIB < chatglm3 < 10 * GIB and 12 * GIB < qwen < 14 * GIB
    assert qwen < 24 * GIB - memory_budget.SERVICES_GIB * GIB  # with room to spare for the OS


def test_both_seed_models_in_fp32_are_refused_naming_them_and_what_fits():
    needs = [Need("chatglm3-6b", "fp32", CHATGLM3, 2), Need("qwen-7b-chat", "fp32", QWEN, 1)]
    message = memory_budget.check(needs, 24 * GIB)
    assert message.startswith("not enough memory")
    assert "qwen-7b-chat (fp32): about 30" in message and "chatglm3-6b (fp32): about 24" in message
    assert "with backend itrex-int8 about" in message and "Everything in itrex-int8 would fit" in message


def test_one_fp32_next_to_int8_is_refused_too():
    message = memory_budget.check([Need("chatglm3-6b", "itrex-int8", CHATGLM3, 2), Need("qwen-7b-chat", "fp32", QWEN, 1)], 24 * GIB)
    assert "qwen-7b-chat (fp32)" in message and "chatglm3-6b (itrex-int8)" in message


def test_download_skips_duplicate_bin_weights_when_safetensors_exist():
    from workers.models.download import skip_patterns

    chatglm3_files = ["config.json", "model-00001-of-00007.safetensors", "pytorch_model-00001-of-00007.bin",
                      "pytorch_model.bin.index.json", "model.safetensors.index.json", "tokenizer.model"]
    assert skip_patterns(chatglm3_files) == ["*.bin", "*.bin.index.json"]
    assert skip_patterns(["config.json", "pytorch_model.bin"]) == []
