"""The publish stage: adapter, merged model, GGUF, registry push, model card and manifest.json."""
