"""Training side of reefcap: adaptation recipes and protocols, the one training loop, evaluation, comparison
reports and the frontier of protocols, the router's fit, WiSE-FT merges, the retraining loop (`reefcap adapt`)
and bundling models into the zoo. The ReefScenes renderer and its optics live in :mod:`reefcap.models.reefscenes`."""
