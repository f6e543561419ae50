"""The enclave custody tier: the host↔enclave protocol, its transports, and the enclave side.

Host-side code (``signd.custody.enclave``) imports only :mod:`signd.enclave.protocol`,
:mod:`signd.enclave.transport` and :mod:`signd.enclave.client`; the enclave application
(:mod:`signd.enclave.signer`, :mod:`signd.enclave.server`) decodes chains and may import
``signd.chains``. This package imports nothing on purpose, so the host side never pulls the
enclave side in.
"""
