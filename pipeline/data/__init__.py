"""The data layer: what stages hand to each other and how images get there; no framework.

`formats` (ingested and prepared data on disk), `images` (safe decoding, pixel conversion,
perceptual hashes, resizing), `sources` (where the candidate images come from: an image folder
or an array dataset), `duplicates` (near-duplicates across splits), `parallel` (crash-proof
worker pools), `writer` (prepare's split arrays, filled by those pools) and `review` (the
reviewed drops and relabels of `data/review/exclude.csv`, and the audit's applied ones).
"""
