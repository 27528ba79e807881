#!/usr/bin/env bash
# GPU check, one prepared script for a CUDA machine (run from the repo root):
#   1. trains one epoch on the GPU (seconds per epoch), 2. exports the book's weights,
#   3. serves them with the TorchScript runtime on CUDA and sends real PNGs (single and concurrent).
# Needs the repo's Python deps (bentoml included) and MNIST in $MNIST_DATA_DIR. Output goes to ${OUT:-/tmp/gpu}.
set -euo pipefail
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
export BENTOML_HOME="$OUT/bentoml" MNIST_RUNTIME=torchscript PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('device:', torch.cuda.get_device_name(0))"
$PY -m training --device cuda --epochs 1 --out "$OUT/train" 2>&1 | tail -2
$PY -m export build --checkpoint ../shared/book/convnet.pth --out "$OUT/export" --no-int8 2>&1 | tail -2
$PY -m bentoml serve --port 3456 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf localhost:3456/readyz >/dev/null && break; sleep 1; done
curl -s -X POST localhost:3456/model_info | tee "$OUT/model_info.json"; echo
curl -s -F images=@../shared/book/digit_image.jpg localhost:3456/predict; echo
$PY - <<'PY'
import io, concurrent.futures as cf, httpx, numpy as np
from PIL import Image
from training.data import load_mnist, resolve_data_dir
imgs, labels = load_mnist(resolve_data_dir(), train=False)
def send(i):
    buf = io.BytesIO(); Image.fromarray(imgs[i].numpy()).save(buf, format="PNG")
    r = httpx.post("http://127.0.0.1:3456/predict", files=[("images", ("d.png", buf.getvalue(), "image/png"))], timeout=60)
    return r.status_code, r.json()[0]["digit"] if r.status_code == 200 else None
with cf.ThreadPoolExecutor(64) as pool:
    res = list(pool.map(send, range(512)))
ok = sum(s == 200 for s, _ in res); right = sum(d == int(labels[i]) for i, (_, d) in enumerate(res))
print(f"512 concurrent requests on CUDA TorchScript: {ok} ok, {right} right")
PY
