"""minibatch: a teaching and reference LLM inference engine.

``from minibatch import LLM, SamplingParams`` gives the vLLM-shaped user API; the
modules underneath (``layers``, ``attention``, ``model``, ``sampling``, ...) are the
readable NumPy specification that the GPU backend in ``minibatch_gpu`` mirrors.
"""

from minibatch.config import ModelConfig
from minibatch.llm import LLM
from minibatch.outputs import CompletionOutput, RequestOutput
from minibatch.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelConfig"]
__version__ = "0.1.0"
