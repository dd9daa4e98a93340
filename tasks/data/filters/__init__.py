"""The ``filter`` stage's building blocks, one module per kind of check.

Each module owns its config section and its check: ``langid`` (language and score),
``toxicity`` (offensive-language score), ``quality`` (datatrove's Gopher, C4 and FineWeb
filters on prose), ``code`` (heuristics for source files), ``decontam`` (long n-gram overlap
with evaluation sets). ``rules`` composes them into per-domain rule sets and ``batch`` applies
a rule set to an Arrow batch of documents.
"""
