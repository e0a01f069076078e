# There, sourced at the start of a device command from the repository root (`. scripts/gpu/env.sh && ...`):
# installs the carried wheels, runs ember from the source tree, and once both halves of the embedded GGUF have
# been carried (in two calls on the same warm machine, either order; kept in /tmp between them) joins them and
# points ember at the result. Defines LAT, the batch-1 bench of docs/PERFORMANCE.md, and step, which prints the
# seconds since this file was sourced.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
for half in 1 2; do
  if [ -f .gg$half/part ]; then
    # A half from a new prepare.sh: drop a join of older halves.
    [ "$(cat .gg$half/sha256)" = "$(cat /tmp/ember_gguf.sha256 2>/dev/null)" ] || rm -f /tmp/embedded.gguf
    cp .gg$half/part /tmp/ember_gguf_part$half && cp .gg$half/sha256 /tmp/ember_gguf_part$half.sha256
  fi
done
if [ ! -f /tmp/embedded.gguf ] && [ -f /tmp/ember_gguf_part1 ] && [ -f /tmp/ember_gguf_part2 ]; then
  want=$(cat /tmp/ember_gguf_part2.sha256)
  if [ "$want" = "$(cat /tmp/ember_gguf_part1.sha256)" ]; then
    cat /tmp/ember_gguf_part1 /tmp/ember_gguf_part2 > /tmp/embedded.gguf.part
    if [ "$(sha256sum /tmp/embedded.gguf.part | cut -c1-64)" = "$want" ]; then
      mv /tmp/embedded.gguf.part /tmp/embedded.gguf && echo "$want" > /tmp/ember_gguf.sha256
    else
      rm -f /tmp/embedded.gguf.part; echo "env.sh: the joined GGUF's sha256 differs from prepare.sh's" >&2; exit 1
    fi
  else
    echo "env.sh: the two GGUF halves come from different prepare.sh runs; carry both again" >&2
  fi
fi
[ -f /tmp/embedded.gguf ] && export EMBER_EMBEDDED_GGUF=/tmp/embedded.gguf
LAT_ARGS="llama-3.1-8b-instruct --load-format dummy --tokenizer .tok --max-model-len 4096 --max-num-seqs 4 --input-len 32 --output-len 128"
LAT="python3 -m ember bench latency $LAT_ARGS"
step() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
