"""The peer ``make bench-server`` measures reefcap against: a LitServe service around the transformers BLIP model.

This is the server a competent user writes instead of running reefcap: LitServe's own dynamic batching
(``max_batch_size`` 16, ``batch_timeout`` 10 ms), the checkpoint's own ``BlipProcessor`` and ``generate``
under ``torch.inference_mode``, images as base64 in JSON (LitServe hands decoded request payloads between its
HTTP and inference processes, so JSON is its natural shape for image uploads), torch's default threads
(one per core here: a user keeps them, and it is the faster choice for a lone model on a small CPU). It decodes
like reefcap's bench configuration: greedy, ``max_length`` tokens with BLIP's "a picture of" prompt included.

Run it as ``python -m reefcap.bench.peer MODEL --port P`` (needs the ``bench`` extra: litserve).
``POST /predict`` with ``{"image": "<base64>"}`` answers ``{"caption": "..."}``; ``GET /health`` is LitServe's.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys

# Imported at the top on purpose: LitServe pickles the API class into its inference process, so the class must
# live at module level (a class built inside a function cannot be pickled). Only the peer's own process and
# the bench import this module; the bench extra (litserve) is what it needs.
import litserve as ls
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

PROMPT = "a picture of"


class BlipCaptionAPI(ls.LitAPI):
    """BLIP captioning as a batched LitServe API: one image per request, a list of images per ``predict``."""

    def __init__(self, model: str, max_length: int = 20, threads: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_path, self.max_length, self.threads = model, max_length, threads

    def setup(self, device: str) -> None:
        if self.threads:  # set here: setup runs in LitServe's inference worker process
            torch.set_num_threads(self.threads)
        self.device = device
        self.processor = BlipProcessor.from_pretrained(self.model_path)
        self.model = BlipForConditionalGeneration.from_pretrained(self.model_path).to(device).eval()

    def decode_request(self, request: dict) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")

    def predict(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, text=[PROMPT] * len(images), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_length=self.max_length, num_beams=1, do_sample=False)
        captions = self.processor.batch_decode(out, skip_special_tokens=True)
        return [c[len(PROMPT) :].strip() if c.startswith(PROMPT) else c.strip() for c in captions]

    def encode_response(self, caption: str) -> dict[str, str]:
        return {"caption": caption}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LitServe BLIP captioning peer for make bench-server")
    parser.add_argument("model", help="a local BLIP checkpoint in Hugging Face format")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--accelerator", default="auto", help="auto picks CUDA when torch sees a GPU")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    api = BlipCaptionAPI(
        args.model, args.max_length, args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    # timeout: the longest a request may wait for its answer (LitServe's default is 30 s; 120 s keeps the
    # blip-base-shape runs from being cut off by it rather than measured).
    server = ls.LitServer(api, accelerator=args.accelerator, timeout=120)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
