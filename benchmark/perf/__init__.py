"""Performance tools: step time, memory and MFU (``benchmark bench``), the CUDA check (``make gpu-check``)."""
