"""ReefScenes, reefcap's synthetic underwater captioning benchmark, in a room of its own.

- :mod:`.scenes` (layouts from a seed), :mod:`.painter` (the in-air image and range map: backgrounds,
  compositing) with :mod:`.subjects` (the canvas and the subjects drawn on it), :mod:`.optics`
  (underwater image formation), :mod:`.captions` (the caption grammar);
- :mod:`.probe`: one scene rendered in both domains, and the small probe set the quality gate scores on;
- :mod:`.dataset`: the dataset writer (``reefcap data reefscenes``, ``reefcap data underwater``);
- :mod:`.realism`: the report comparing renderings with real underwater photos (``reefcap data report``).
"""
