"""Release: an adapter made into something people run elsewhere.

merge (dequantize -> merge -> full weights) with model_card and verify (logit agreement), gguf (+ gguf_verify)
for llama.cpp, bundle (one untied base + plain LoRA per adapter, + bundle_card, bundle_verify) and llama_server
(`tear-lora serve`). May import: data/, train/ and the root modules. Never study/.
"""
