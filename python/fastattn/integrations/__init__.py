"""Optional framework backends. Each submodule imports its framework when it is
imported itself, never from `import fastattn`:

    import fastattn.integrations.transformers   # attn_implementation="fastattn"
"""
