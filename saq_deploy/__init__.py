"""saq-deploy: sampling-aware quantization for diffusion UNets, shipped as real engines.

`import saq_deploy` is kept light: it imports neither onnxruntime nor tensorrt (nor diffusers)
until a function that needs them is called.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
