"""Regenerate apdm_core/sd_configs/clip_merges.txt.gz, the CLIP BPE merges SD1.x and SD2.x use.

The vocabulary ships inside the ``open_clip_torch`` wheel on PyPI as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. CLIP's SimpleTokenizer uses its lines
1 .. 48894 (``merges[1:49152-256-2+1]``) as the BPE merges; the 49408-entry vocabulary is
derived from them (256 byte tokens, the same with ``</w>``, one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``), see ``apdm_core.clip_tokenizer.clip_vocab``. Only
those merges are kept, gzip-compressed with a fixed mtime so the file is reproducible
(~200 KB instead of ~1.4 MB for vocab.json + merges.txt).

    pip download open_clip_torch --no-deps -d /tmp/oc
    python tools/make_clip_merges.py /tmp/oc/open_clip_torch-*.whl
"""

from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
OUT = Path(__file__).resolve().parents[1] / "apdm_core" / "sd_configs" / "clip_merges.txt.gz"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        lines = gzip.decompress(zf.read(MEMBER)).decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    assert len(merges) == N_MERGES and all(len(m.split()) == 2 for m in merges)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(("\n".join(merges) + "\n").encode("utf-8"))
    OUT.write_bytes(buf.getvalue())
    print(f"wrote {OUT} ({len(buf.getvalue())} bytes, {len(merges)} merges)")


if __name__ == "__main__":
    main(sys.argv[1])
