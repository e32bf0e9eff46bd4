"""The CLIP tokenizer of SD1.x and SD2.x, shipped once (one BPE vocabulary; SD2 pads with "!"): rebuilt
from ``sd_configs/clip_merges.txt.gz`` and loaded with ``CLIPTokenizer.from_pretrained``, offline."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import tempfile
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().with_name("sd_configs")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (transformers' own)."""
    try:  # transformers >= 4.4x, 5.x
        from transformers.convert_slow_tokenizer import bytes_to_unicode as table
    except ImportError:  # older transformers (e.g. A1111's 4.30)
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode as table
    return table()


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's BPE vocabulary (token -> id, 49408 entries) and merges, built as CLIP's SimpleTokenizer does.

    Ids: the 256 byte symbols, the same with ``</w>``, one token per merge in merge order,
    then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.
    """
    merges = tuple(gzip.decompress((CONFIG_ROOT / "clip_merges.txt.gz").read_bytes()).decode().splitlines())
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_vocab(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt (the Hugging Face files) of the CLIP vocabulary into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def load_tokenizer(config_dir: str | Path, subfolder: str = "tokenizer"):
    """The CLIPTokenizer of a config folder: its own tokenizer/ (SDXL: also tokenizer_2/) files, or the shipped
    vocabulary with its settings."""
    from transformers import CLIPTokenizer

    tok_dir = Path(config_dir) / subfolder
    if (tok_dir / "vocab.json").exists():
        return CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="apdm-tokenizer-") as tmp:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (tok_dir / name).exists():
                shutil.copy(tok_dir / name, Path(tmp) / name)
        return CLIPTokenizer.from_pretrained(write_clip_vocab(tmp), local_files_only=True)
