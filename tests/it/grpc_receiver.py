"""A minimal OTLP/gRPC trace receiver for the tests: prints "<trace id> <span name>" per span.

Usage: python grpc_receiver.py PORT (needs grpcio and opentelemetry-proto)."""
import sys, time
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

class Svc(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    print(s.trace_id.hex(), s.name, flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Svc(), server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
print("listening", flush=True)
server.wait_for_termination()
