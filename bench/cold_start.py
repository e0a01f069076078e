"""Cold start: launch `ember serve`, time /health 200 and the first streamed token, from process start.

    python bench/cold_start.py MODEL_DIR [--log FILE] [--enforce-eager] [extra serve flags]

--log FILE keeps the server's whole log (timestamped lines), to see where the seconds between phases went.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx


def main() -> None:
    args = sys.argv[1:]
    log_file = None
    if "--log" in args:
        i = args.index("--log")
        log_file = args[i + 1]
        del args[i:i + 2]
    model, extra = args[0], args[1:]
    port = 8017
    cmd = [sys.executable, "-m", "ember", "serve", model, "--port", str(port), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    health = first = None
    try:
        while time.perf_counter() - t0 < 300 and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    health = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        if health is not None:
            body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first = time.perf_counter() - t0
                        break
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    phases = [line for line in out.splitlines()
              if "engine ready" in line or "ember ready" in line or "process start to serve" in line]
    if log_file:
        with open(log_file, "w") as f:
            f.write(out)
    print(json.dumps({"cmd": " ".join(cmd[2:]), "health_s": health, "first_token_s": first}))
    print("\n".join(phases))


if __name__ == "__main__":
    main()
