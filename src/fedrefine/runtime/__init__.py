"""Participants and the fuser registry as gRPC services, and the clients a receiver uses to reach them.

    fedrefine serve participant   -> participant_server: Prefill / Hint / Rephrase / Identity + health
    fedrefine serve registry      -> registry_server: fusers by exact (sender, receiver) with sha256s
    a receiver's federation config names a sender by endpoint -> participant_client.RemoteParticipant

Protocol buffers live in ``protos/``; the generated ``*_pb2*.py`` modules are committed (regenerate
with ``python -m fedrefine.runtime.protos``, which needs ``grpcio-tools``).
"""
