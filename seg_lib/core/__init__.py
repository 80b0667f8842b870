"""The host-free SEG math: query blur, token grid, guidance, block selection and the parameter table.

Nothing here imports a WebUI module or gradio, so it can be tested and benchmarked on its own.
"""
