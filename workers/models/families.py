"""Per-model fixes needed to run on CPU, applied to the config before any weights load."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig


def prepare_cpu_config(source: Path, trust_remote_code: bool) -> PretrainedConfig:
    return apply_cpu_overrides(AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code))


def apply_cpu_overrides(config: PretrainedConfig) -> PretrainedConfig:
    if getattr(config, "model_type", None) == "qwen":
        # Qwen's remote code picks half precision from config.fp16/bf16 (and FastChat's Qwen
        # adapter forces fp16), which fails on CPU: "addmm_impl_cpu_ not implemented for 'Half'".
        config.fp16 = False
        config.bf16 = False
        config.fp32 = True
        config.use_flash_attn = False
    return config
