#!/usr/bin/env bash
# Here, before a GPU session (after scripts/setup.sh): what a bare GPU machine lacks, in folders git ignores and
# a device call carries. .whl: the server wheels (../shared/device/fetch-wheels); .tok: the embedded model's
# tokenizer, for --tokenizer with 8B dummy weights; .gg1 and .gg2: the embedded GGUF in two halves, since the
# whole of it and the wheels exceed one call's 64 MiB (carry .gg1 in one call and .gg2 in a later one on the same
# machine; env.sh joins them). Carry .whl, .tok and a half, and start each command with `. scripts/gpu/env.sh &&`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ex=$(git rev-parse --git-path info/exclude)
for d in /.whl/ /.tok/ /.gg1/ /.gg2/; do grep -qxF "$d" "$ex" 2>/dev/null || echo "$d" >> "$ex"; done
if ! compgen -G ".whl/*.whl" > /dev/null; then  # none yet, or a fetch that failed part-way
  [ -x ../shared/device/fetch-wheels ] || { echo "prepare.sh: ../shared/device/fetch-wheels not found" >&2; exit 1; }
  ../shared/device/fetch-wheels
fi
gguf=$(.venv/bin/python -c "from ember.model.loader import embedded_gguf_path; print(embedded_gguf_path())")
if [ ! -f .tok/tokenizer.json ]; then
  .venv/bin/python -c "import sys; from ember.tokenizer import Tokenizer
Tokenizer.load(sys.argv[1], sys.argv[1], set()).hf.save_pretrained('.tok')" "$gguf"
fi
rm -rf .gg1 .gg2
mkdir -p .gg1 .gg2
tmp=$(mktemp -d)
split -n 2 -d "$gguf" "$tmp/part"
mv "$tmp/part00" .gg1/part
mv "$tmp/part01" .gg2/part
rmdir "$tmp"
sha256sum "$gguf" | cut -c1-64 | tee .gg1/sha256 > .gg2/sha256
du -sh .whl .tok .gg1 .gg2
