"""The GPU catalog and name lookup (planner/gpus.py, planner/gpu_catalog.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmplan.planner.gpu_catalog import AMBIGUOUS_NAMES, GPUS
from llmplan.planner.gpus import (
    DEFAULT_GPU_NAME,
    GpuSpec,
    ProbedGpu,
    UnknownGpuError,
    catalog_gpus,
    default_gpu,
    default_planning_notice,
    describe_memory,
    find_gpu,
    gpu_with_memory,
    lookup_gpu,
    match_nvml_name,
    normalize_gpu_name,
    suggest_gpus,
)
from llmplan.planner.units import GB, GiB, MiB

REQUIRED = (
    "P40", "P100 16GB", "V100 16GB", "V100 32GB", "T4", "A10", "A10G", "A40", "A100 40GB", "A100 80GB",
    "L4", "L40S", "RTX 3090", "RTX 4090", "RTX 5090", "RTX A6000", "H100 PCIe", "H100 SXM", "H200", "B200",
)

# Totals NVML reports on these cards (nvidia-smi "MiB" column, current drivers).
NVML_TOTALS_MIB = {
    "H100 SXM": 81559,
    "H100 PCIe": 81559,
    "A100 80GB": 81920,
    "H200": 143771,
    "RTX 4090": 24564,
    "P40": 24576,
    "T4": 15360,
    "V100 16GB": 16384,
    "V100 32GB": 32768,
    "A10G": 23028,
    "L4": 23034,
}


# ---- catalog data -------------------------------------------------------------------------------
def test_catalog_has_every_required_card_once() -> None:
    names = [spec.name for spec in GPUS]
    assert len(names) == len(set(names))
    assert set(REQUIRED) <= set(names)
    assert catalog_gpus() == GPUS


@pytest.mark.parametrize("spec", GPUS, ids=lambda spec: spec.name)
def test_every_entry_is_complete_and_sourced(spec: GpuSpec) -> None:
    assert spec.source.startswith("https://")
    assert spec.memory_gb > 0 and spec.memory_bytes > 0
    assert spec.fp32_tflops and spec.fp16_tflops and spec.memory_bandwidth_gbps and spec.interconnect_gbps
    assert spec.nvml_names, "each card needs the name NVML reports, for the probe to find it"
    assert spec.bf16 == (spec.compute_capability >= (8, 0))
    assert (spec.bf16_tflops is not None) == spec.bf16
    if spec.tensor_cores:
        assert spec.fp16_tflops > spec.fp32_tflops  # a tensor rate, not the CUDA-core one
    # NVML's total sits within 7% of the datasheet figure read as GiB (ECC and reservations)
    assert abs(spec.memory_bytes / GiB - spec.memory_gb) / spec.memory_gb < 0.07
    assert spec.memory_basis == "nvml" and not spec.memory_approximate


@pytest.mark.parametrize(("name", "mib"), sorted(NVML_TOTALS_MIB.items()))
def test_memory_is_what_nvml_reports_on_the_card(name: str, mib: int) -> None:
    spec = lookup_gpu(name)
    assert spec.nvml_memory_mib == mib
    assert spec.memory_bytes == mib * MiB


def test_datasheet_gb_as_decimal_is_below_every_known_nvml_total() -> None:
    """The approximation used for cards without an NVML figure never overstates memory."""
    for spec in GPUS:
        assert spec.memory_gb * GB <= spec.nvml_memory_mib * MiB, spec.name


def test_p40_computes_fp16_at_one_sixty_fourth_of_fp32() -> None:
    p40 = lookup_gpu("P40")
    assert p40.compute_capability == (6, 1)
    assert p40.fp16_tflops == pytest.approx(0.18, abs=0.01)
    assert p40.fp16_tflops == pytest.approx(p40.fp32_tflops / 64, rel=0.05)
    assert not p40.tensor_cores and p40.bf16_tflops is None and not p40.bf16


def test_headline_numbers() -> None:
    assert lookup_gpu("H100 SXM").bf16_tflops == pytest.approx(989, rel=0.01)
    assert lookup_gpu("A100 80GB").bf16_tflops == 312
    assert lookup_gpu("A100 80GB").memory_bandwidth_gbps == 2039
    assert lookup_gpu("H200").memory_bandwidth_gbps == 4800
    assert lookup_gpu("RTX 4090").fp16_tflops == pytest.approx(165.2)
    assert lookup_gpu("V100 32GB").fp16_tflops == 125
    assert lookup_gpu("H100 SXM").interconnect == "NVLink"
    assert lookup_gpu("H100 PCIe").interconnect == "PCIe"


def test_bitsandbytes_support_follows_compute_capability() -> None:
    assert all(spec.bitsandbytes and spec.bnb_4bit for spec in GPUS)  # every card is cc 6.0+
    no_int8 = {spec.name for spec in GPUS if not spec.bnb_int8}
    assert no_int8 == {"P40", "P100 16GB", "V100 16GB", "V100 32GB"}
    for name in no_int8:
        assert "LLM.int8" in lookup_gpu(name).bitsandbytes_note
    assert "sm_100" in lookup_gpu("B200").bitsandbytes_note
    assert "sm_120" in lookup_gpu("RTX 5090").bitsandbytes_note
    maxwell = GpuSpec(name="M40", compute_capability=(5, 2), memory_gb=24)
    kepler = GpuSpec(name="K80", compute_capability=(3, 7), memory_gb=12)
    assert maxwell.bnb_4bit and not maxwell.bnb_int8
    assert not kepler.bitsandbytes


def test_every_spec_serializes_to_json() -> None:
    data = json.loads(json.dumps([spec.to_dict() for spec in GPUS]))
    h200 = next(item for item in data if item["name"] == "H200")
    assert h200["compute_capability"] == "9.0"
    assert h200["memory_bytes"] == 143771 * MiB
    assert h200["bf16"] is True and h200["bnb_int8"] is True


# ---- lookup -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("A100-80GB", "A100 80GB"),
        ("a100 80gb", "A100 80GB"),
        ("A100-SXM4-80GB", "A100 80GB"),
        ("a100 80g", "A100 80GB"),
        ("A100_40GB", "A100 40GB"),
        ("H100", "H100 SXM"),
        ("H100-SXM", "H100 SXM"),
        ("h100 pcie", "H100 PCIe"),
        ("4090", "RTX 4090"),
        ("RTX4090", "RTX 4090"),
        ("rtx 4090", "RTX 4090"),
        ("GeForce RTX 4090", "RTX 4090"),
        ("3090", "RTX 3090"),
        ("5090", "RTX 5090"),
        ("A6000", "RTX A6000"),
        ("t4", "T4"),
        ("Tesla T4", "T4"),
        ("a10g", "A10G"),
        ("A10", "A10"),
        ("l40s", "L40S"),
        ("L4", "L4"),
        ("p100", "P100 16GB"),
        ("V100-32GB", "V100 32GB"),
        ("h200", "H200"),
        ("B200", "B200"),
    ],
)
def test_lookup_is_case_insensitive_and_knows_aliases(query: str, name: str) -> None:
    assert lookup_gpu(query).name == name


@pytest.mark.parametrize(
    ("nvml_name", "name"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("A100-SXM4-40GB", "A100 40GB"),  # drivers before R470 left out the vendor
        ("Tesla P40", "P40"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("Tesla V100-SXM2-16GB", "V100 16GB"),
        ("Tesla T4", "T4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("NVIDIA B200", "B200"),
    ],
)
def test_nvml_names_map_to_catalog_entries(nvml_name: str, name: str) -> None:
    spec = match_nvml_name(nvml_name)
    assert spec is not None and spec.name == name


@pytest.mark.parametrize("nvml_name", ["NVIDIA A100 80GB PCIe", "NVIDIA H200 NVL", "NVIDIA H100 NVL", "NVIDIA L40"])
def test_nvml_names_of_other_cards_match_nothing(nvml_name: str) -> None:
    assert match_nvml_name(nvml_name) is None


def test_every_nvml_name_and_alias_finds_its_own_entry() -> None:
    for spec in GPUS:
        for name in (spec.name, *spec.aliases, *spec.nvml_names):
            assert find_gpu(name) is spec, name


def test_normalize_gpu_name() -> None:
    assert normalize_gpu_name("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert normalize_gpu_name("NVIDIA A100-SXM4-80GB") == "a100sxm480g"
    assert normalize_gpu_name(" a100  80 GB ") == normalize_gpu_name("A100-80G")


@pytest.mark.parametrize(
    ("typo", "expected"),
    [("RTX 4900", "RTX 4090"), ("H10O", "H100 SXM"), ("L40", "L40S"), ("A600", "RTX A6000"), ("T44", "T4")],
)
def test_misspellings_get_did_you_mean(typo: str, expected: str) -> None:
    with pytest.raises(UnknownGpuError) as caught:
        lookup_gpu(typo)
    assert expected in caught.value.suggestions
    assert "Did you mean" in str(caught.value) and expected in str(caught.value)
    assert expected in suggest_gpus(typo)


def test_unknown_name_says_what_to_do_next() -> None:
    with pytest.raises(UnknownGpuError) as caught:
        lookup_gpu("Voodoo2")
    message = str(caught.value)
    assert "Voodoo2" in message and "--gpu-mem" in message and "llmplan gpus --catalog" in message
    assert find_gpu("Voodoo2") is None


@pytest.mark.parametrize("name", ["A100", "a100", "V100", "A100 SXM4"])
def test_names_of_several_cards_ask_which_one(name: str) -> None:
    with pytest.raises(UnknownGpuError) as caught:
        lookup_gpu(name)
    assert len(caught.value.suggestions) == 2
    for choice in caught.value.suggestions:
        assert repr(choice) in str(caught.value)
        lookup_gpu(choice)  # each choice resolves


def test_ambiguous_names_are_not_aliases() -> None:
    for name in AMBIGUOUS_NAMES:
        assert find_gpu(name) is None


# ---- defaults and derived specs -----------------------------------------------------------------
def test_default_card_is_a_24gb_rtx_4090() -> None:
    assert DEFAULT_GPU_NAME == "RTX 4090"
    spec = default_gpu()
    assert spec.name == "RTX 4090" and spec.memory_gb == 24
    assert default_planning_notice() == (
        "no GPU found: planning for 1 x RTX 4090 (24 GB); use --gpu NAME or --gpu-mem SIZE"
    )


def test_gpu_with_memory_keeps_throughput_and_takes_the_size() -> None:
    spec = gpu_with_memory(16 * GiB)
    assert spec.memory_bytes == 16 * GiB and spec.memory_basis == "user"
    assert spec.name == "RTX 4090-class, 16.0 GiB"
    assert spec.label == "RTX 4090-class, 16.0 GiB (16.0 GiB)"
    assert spec.fp16_tflops == lookup_gpu("RTX 4090").fp16_tflops
    assert spec.memory_gb == 0 and spec.nvml_names == () and spec.aliases == ()
    assert gpu_with_memory(40 * GiB, like="A100 80GB").bf16_tflops == 312
    with pytest.raises(ValueError, match="positive"):
        gpu_with_memory(0)


def test_spec_without_nvml_figure_approximates_and_says_so() -> None:
    spec = GpuSpec(name="Future card", compute_capability=(10, 0), memory_gb=96)
    assert spec.memory_bytes == 96 * GB
    assert spec.memory_approximate
    assert describe_memory(spec).startswith("96 GB (~")
    assert not lookup_gpu("H200").memory_approximate
    assert describe_memory(lookup_gpu("H200")) == "141 GB (140.4 GiB)"


def test_specs_are_frozen_and_derive_bf16() -> None:
    spec = lookup_gpu("T4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.memory_bytes = 1  # type: ignore[misc]
    assert dataclasses.replace(spec, compute_capability=(8, 0)).bf16  # recomputed, not copied


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compute_capability": (7, 0), "memory_gb": 16, "bf16_tflops": 10.0}, "bf16"),
        ({"compute_capability": (8,), "memory_gb": 16}, "compute_capability"),
        ({"compute_capability": (8, 0)}, "memory"),
        ({"compute_capability": (8, 0), "memory_gb": 16, "interconnect": "InfiniBand"}, "interconnect"),
        ({"compute_capability": (8, 0), "memory_gb": -1}, "negative"),
        ({"compute_capability": (8, 0), "memory_gb": 16, "memory_basis": "guess"}, "memory_basis"),
    ],
)
def test_invalid_specs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GpuSpec(name="X", **kwargs)


def test_probed_gpu_plans_with_catalog_throughput_and_measured_memory() -> None:
    h200 = lookup_gpu("H200")
    probed = ProbedGpu(index=0, name="NVIDIA H200", uuid="GPU-1", memory_total_bytes=143771 * MiB,
                       memory_used_bytes=500 * MiB, memory_free_bytes=143271 * MiB,
                       compute_capability=(9, 0), catalog=h200)
    spec = probed.planning_spec()
    assert spec.memory_bytes == 143771 * MiB and spec.memory_basis == "probed"
    assert spec.bf16_tflops == h200.bf16_tflops and spec.name == "H200"
    assert probed.bf16


def test_probed_unknown_gpu_plans_with_memory_only() -> None:
    probed = ProbedGpu(index=1, name="NVIDIA Mystery", uuid="GPU-2", memory_total_bytes=10 * GiB,
                       memory_used_bytes=0, memory_free_bytes=10 * GiB, compute_capability=(7, 5))
    spec = probed.planning_spec()
    assert spec.name == "NVIDIA Mystery" and spec.memory_bytes == 10 * GiB
    assert spec.fp16_tflops is None and not spec.bf16 and spec.bnb_int8
    empty = dataclasses.replace(probed, memory_total_bytes=0)
    with pytest.raises(ValueError, match="--gpu-mem"):
        empty.planning_spec()
