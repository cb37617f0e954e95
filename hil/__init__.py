"""Hardware-in-the-loop rig: the virtual board (hil.virtual) and board transports."""
