"""sd-webui-seg: Smoothed Energy Guidance for the AUTOMATIC1111 and Forge WebUIs.

``seg_lib.core`` is pure torch and the standard library; host adapters live beside it.
"""
