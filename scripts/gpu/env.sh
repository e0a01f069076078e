# There, sourced at the start of a device command (`. scripts/gpu/env.sh`), from the repository root: installs the
# carried wheels, runs ember from the source tree, and joins the embedded GGUF once both halves have been carried
# (.gg1 in an earlier call on the same warm machine, kept in /tmp). Defines LAT, the batch-1 bench of
# docs/PERFORMANCE.md, and step, which prints seconds since this file was sourced.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -f .gg1/part ] && cp .gg1/part /tmp/ember_gguf_part00
if [ -f .gg2/part ] && [ -f /tmp/ember_gguf_part00 ]; then
  cat /tmp/ember_gguf_part00 .gg2/part > /tmp/embedded.gguf.part
  if [ "$(sha256sum /tmp/embedded.gguf.part | cut -c1-64)" = "$(cat .gg2/sha256)" ]; then
    mv /tmp/embedded.gguf.part /tmp/embedded.gguf
  else
    echo "the joined GGUF's sha256 differs: were .gg1 and .gg2 made together?"
  fi
fi
[ -f /tmp/embedded.gguf ] && export EMBER_EMBEDDED_GGUF=/tmp/embedded.gguf
LAT="python3 -m ember bench latency llama-3.1-8b-instruct --load-format dummy --tokenizer .tok --max-model-len 4096 --max-num-seqs 4 --input-len 32 --output-len 128"
step() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
