"""Hopper (sm_90a) kernels: warpgroup MMAs (wgmma) fed by TMA, register-resident softmax."""
