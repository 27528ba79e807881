"""``uvicorn bench.peers.fastapi_app:app --workers 2 --loop uvloop --http httptools`` (from .bench-venv, with
``MNIST_EXPORT_DIR`` set): a plain FastAPI app doing the work of bench/peers/work.py at POST /predict, one
request at a time in each worker (no batching), on the event loop (no thread hop, as in our service).
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from bench.peers.work import Pipeline

pipeline = Pipeline(os.environ["MNIST_EXPORT_DIR"])  # one per worker process, loaded at import
app = FastAPI()


@app.post("/predict")
async def predict(images: Annotated[list[UploadFile], File()]) -> JSONResponse:
    # JSONResponse directly: FastAPI would otherwise walk the answers through jsonable_encoder first
    return JSONResponse(pipeline([await upload.read() for upload in images]))


@app.get("/health")
async def health() -> PlainTextResponse:
    return PlainTextResponse("ok")
