"""The torch side of sdltag: backbones, the SDL head and loss, training and ONNX export.

Nothing on the tagging path imports this package.
"""
