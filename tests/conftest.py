import os

# Triton kernels run on CPU tensors only in Triton's interpreter, chosen when triton is first
# imported (torch imports it): set before any test module imports torch.
os.environ.setdefault('TRITON_INTERPRET', '1')
