"""Kubernetes' path into pyshim, tested through containerd's CRI plugin (see README, Test).

client.py   the CRI client, gRPC like the kubelet; api_pb2*.py are its generated messages and
            stubs (protos/tests/cri/api.proto, protos/generate.py; never edited by hand)
harness.py  CriContainerd: a private containerd with CRI, pause and busybox images in k8s.io
conftest.py the fixtures; test_cri.py the tests
"""
