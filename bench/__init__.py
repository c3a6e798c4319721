"""Benchmarks and the GPU check: measuring tools, kept out of the serving path.

Nothing in ``reefcap.models``, ``reefcap.server``, ``reefcap.clients`` or ``reefcap.training`` imports this
package. Optional extras (LitServe for the peer) are imported only inside the functions that use them.

- :mod:`.engines`: engines against the naive transformers pipeline (``reefcap bench``, ``make bench``);
- :mod:`.server`, :mod:`.vs`, :mod:`.peer`: the server against the naive pipeline and against a LitServe peer
  (``make bench-server-naive``, ``make bench-server``); :mod:`.bounds`: the client-bounds probe;
- :mod:`.gpu_check`, :mod:`.gpu_sections`: ``make gpu-check``.
"""
