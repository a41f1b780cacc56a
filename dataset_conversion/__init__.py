"""Dataset conversion scripts (checkout convenience).

The converters live in :mod:`nndiff.dataset_conversion` so that installed console scripts and
``nndiff_demo`` can import them; the modules here re-export them and run them as scripts, e.g.
``python -m dataset_conversion.mni152 -o RAW -d 1``.
"""
