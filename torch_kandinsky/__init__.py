"""The PyTorch backend (diffusers models, accelerate).

Importing it first quiets the libraries' noise, before any of its modules imports diffusers'
pipelines (see library_noise).
"""

from torch_kandinsky.library_noise import quiet_libraries

quiet_libraries()
