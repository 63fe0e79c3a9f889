"""The bundled inference runtime: a lean Llama-family model with a static KV cache,
int4 linears on kernel back ends, and generation (gpt-fast style: one concern per file).

    from compress import runtime
    llm = runtime.load("out/smollm2-gptq", device="cpu")
    print(llm.generate("What is the capital of France?", max_new_tokens=16).text)  # chat template applied
    print(llm.generate("The capital of France is", max_new_tokens=16, chat=False).text)  # raw completion
"""

from __future__ import annotations

from compress.runtime.errors import RuntimeInputError

__all__ = ["RuntimeInputError", "load"]


def load(path, device: str = "auto", backend: str = "auto", **kwargs):
    """Load a checkpoint folder (exported int4 or float) into a ready-to-generate object."""
    from compress.runtime.generate import load as _load

    return _load(path, device=device, backend=backend, **kwargs)
