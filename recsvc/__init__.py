"""recsvc: text-aware recommendations (fine-tuned BERT retrieval, FAISS, LightGBM) served over gRPC."""

import logging

# faiss's loader logs every SIMD build it tries at INFO ("No module named swigfaiss_avx512"),
# which reads like an error in every CLI's output; it still logs a real failure at WARNING.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
