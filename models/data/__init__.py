"""Data: image decoding with limits (:mod:`.images`, the one decoder every entrypoint and training use), the
caption record type with splits and COCO writing (:mod:`.records`), and readers for the dataset formats users
have (:mod:`.datasets`)."""
