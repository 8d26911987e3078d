"""Protocol response messages built from the engine's values (metadata, config, statistics).

Pure functions, no I/O: the servicer asks the engine for values and these shape them the way
KServe v2 and Triton clients expect (Triton's ModelConfig omits the batch dimension from
``dims`` when ``max_batch_size`` > 0; the v2 metadata keeps it as -1).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from cnnserve.common.repository import ModelPolicy, TensorSpec
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import model_config_pb2 as mc

if TYPE_CHECKING:
    from cnnserve.server.engine.core import IndexEntry, LoadedModel
    from cnnserve.server.telemetry.statistics import VersionStats

BACKEND = "onnxruntime"
CUDA_PROVIDER = "CUDAExecutionProvider"


def model_metadata(model: LoadedModel, versions: Sequence[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata: the model's ready ``versions`` and its full tensor shapes (-1 = any)."""
    def tensors(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [pb.ModelMetadataResponse.TensorMetadata(
            name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]

    return pb.ModelMetadataResponse(
        name=model.name, versions=versions, platform=model.config.platform,
        inputs=tensors(model.config.inputs), outputs=tensors(model.config.outputs))


def model_config(model: LoadedModel) -> mc.ModelConfig:
    """Triton's ModelConfig of a loaded version: signature, batching, policy, providers."""
    config, policy = model.config, model.policy
    layout = (mc.ModelInput.FORMAT_NCHW if config.input_layout == "NCHW"
              else mc.ModelInput.FORMAT_NHWC if config.input_layout == "NHWC"
              else mc.ModelInput.FORMAT_NONE)
    batching = policy.dynamic_batching
    gpu = CUDA_PROVIDER in model.providers
    skip = 1 if config.max_batch_size else 0  # Triton's dims omit the batch dimension
    return mc.ModelConfig(
        name=model.name,
        platform=config.platform,
        backend=BACKEND,
        max_batch_size=config.max_batch_size,
        version_policy=version_policy(policy),
        input=[mc.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:],
                             format=layout if len(s.shape) == 4 else mc.ModelInput.FORMAT_NONE)
               for s in config.inputs],
        output=[mc.ModelOutput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:])
                for s in config.outputs],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=batching.preferred_batch_size,
            max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT, allow_timeout_override=True,
                max_queue_size=batching.max_queue_size)),
        instance_group=[mc.ModelInstanceGroup(
            name=model.name, count=model.instance_count,
            kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)],
        default_model_filename=model.source.model_file.name,
        parameters=config_parameters(model),
    )


def config_parameters(model: LoadedModel) -> dict[str, mc.ModelParameter]:
    """What a client needs beyond the signature, as JSON strings in ModelConfig.parameters.

    ``labels`` (list of class names) and ``normalization`` ({"mean": [...], "std": [...]},
    applied as (pixel/255 - mean) / std per channel) let a client turn an image into the
    model's input and its output into class names; the protocol has no fields for them.
    ``config_source`` says where the signature came from ("config.json", "config.pbtxt" or
    "the graph"); config.pbtxt's own parameters are passed through.
    ``encoded_images`` ("PNG,JPEG") says the image input also takes those files as BYTES.
    """
    config = model.config
    params = {k: mc.ModelParameter(string_value=v) for k, v in model.source.parameters.items()}
    params |= {
        "config_source": mc.ModelParameter(string_value=model.source.origin),
        "execution_providers": mc.ModelParameter(string_value=",".join(model.providers)),
        "precision": mc.ModelParameter(string_value=config.precision),
    }
    if config.labels:
        params["labels"] = mc.ModelParameter(string_value=json.dumps(list(config.labels)))
    if model.policy.encoded_images:
        params["encoded_images"] = mc.ModelParameter(string_value="PNG,JPEG")
    if config.normalization is not None:
        params["normalization"] = mc.ModelParameter(string_value=json.dumps(
            {"mean": list(config.normalization.mean), "std": list(config.normalization.std)}))
    return params


def data_type(datatype: str) -> mc.DataType.ValueType:
    """Triton's DataType of a protocol datatype name (BYTES is TYPE_STRING)."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def version_policy(policy: ModelPolicy) -> mc.ModelVersionPolicy:
    """model.json's version_policy as Triton's ModelVersionPolicy."""
    vp = policy.version_policy
    if "all" in vp:
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if "specific" in vp:
        return mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=vp["specific"]))
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=vp["latest"]))


def statistics(stats: Iterable[VersionStats]) -> pb.ModelStatisticsResponse:
    """ModelStatistics for each version's cumulative statistics."""
    def duration(count: int, ns: int) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=ns)

    response = pb.ModelStatisticsResponse()
    for s in stats:
        response.model_stats.append(pb.ModelStatistics(
            name=s.name, version=s.version, last_inference=s.last_inference_ms,
            inference_count=s.inference_count, execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=duration(s.success_count, s.success_ns),
                fail=duration(s.fail_count, s.fail_ns),
                queue=duration(s.queue_count, s.queue_ns),
                compute_input=duration(s.compute_input_count, s.compute_input_ns),
                compute_infer=duration(s.compute_infer_count, s.compute_infer_ns),
                compute_output=duration(s.compute_output_count, s.compute_output_ns),
                cache_hit=duration(0, 0), cache_miss=duration(0, 0)),
            batch_stats=[pb.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_input=duration(b.compute_input_count, b.compute_input_ns),
                compute_infer=duration(b.compute_infer_count, b.compute_infer_ns),
                compute_output=duration(b.compute_output_count, b.compute_output_ns))
                for b in s.batch_stats]))
    return response


def repository_index(entries: Iterable[IndexEntry]) -> pb.RepositoryIndexResponse:
    """RepositoryIndex: every model version with its state and, when not ready, why."""
    return pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state,
                                              reason=e.reason)
        for e in entries])
