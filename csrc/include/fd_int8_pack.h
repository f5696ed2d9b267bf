// Packed int8 weights of the CPU kernels (issue 14): one uint8 tensor = a 64-byte header + the kernel's tile
// layout. Packing happens once, when a layer is quantized, frozen or loaded; checkpoints keep the portable
// [N, K] int8 weight and scales (the packed tensor is never saved by Int8Linear), so the layout may change
// between versions and ISAs: every kernel checks the header against its own layout and the call's shapes,
// and a mismatch is an error naming w_packed, never wrong numbers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace fastdistill {

constexpr uint32_t kPackMagic = 0x4b504446u;  // "FDPK" little-endian
constexpr uint32_t kPackVersion = 1;          // bump when any layout or header field changes meaning
constexpr int64_t kPackHeaderBytes = 64;      // keeps the payload 64-byte aligned (CPU allocations are)

enum class PackKind : uint32_t { kW8A8 = 1, kW8A16 = 2 };

struct PackHeader {
  uint32_t magic;
  uint32_t version;
  uint32_t kind;         // PackKind
  uint32_t layout;       // the kernel's layout id (tile sizes, interleave): checked by the kernel that reads it
  int64_t n, k;          // logical shape of the int8 weight [N, K]
  int64_t k_padded;      // K rounded up to the layout's unit (zero padding: zeros change no sum)
  int64_t group_size;    // w8a16 scale groups along K (0 = per output channel); 0 for w8a8
  int64_t payload_bytes;
  uint32_t flags;        // layout-specific (e.g. w8a8: 1 if the weight holds -128)
  uint32_t reserved;
};
static_assert(sizeof(PackHeader) <= kPackHeaderBytes, "PackHeader must fit its 64 bytes");

inline const char* pack_kind_name(uint32_t kind) {
  return kind == uint32_t(PackKind::kW8A8) ? "w8a8" : kind == uint32_t(PackKind::kW8A16) ? "w8a16" : "unknown";
}

// A zeroed uint8 tensor [64 + payload_bytes] with its header written; fill the payload via packed_payload().
inline at::Tensor new_packed(PackKind kind, uint32_t layout, int64_t n, int64_t k, int64_t k_padded,
                             int64_t group_size, int64_t payload_bytes, uint32_t flags = 0) {
  at::Tensor t = at::zeros({kPackHeaderBytes + payload_bytes}, at::TensorOptions().dtype(at::kByte));
  PackHeader h{kPackMagic, kPackVersion, uint32_t(kind), layout, n, k, k_padded, group_size, payload_bytes, flags, 0};
  std::memcpy(t.data_ptr<uint8_t>(), &h, sizeof h);
  return t;
}

// The header of `w_packed` after checking that it is a packed weight of `kind` in `layout`, of this format
// version, for an input dimension K (k >= 0; pass -1 to skip) and N (n >= 0; -1 to skip).
inline PackHeader check_packed(const at::Tensor& w_packed, PackKind kind, uint32_t layout, int64_t n, int64_t k) {
  TORCH_CHECK_TYPE(w_packed.scalar_type() == at::kByte, "w_packed: expected a uint8 packed weight, got ",
                   w_packed.scalar_type());
  TORCH_CHECK_VALUE(w_packed.dim() == 1 && w_packed.is_contiguous() && w_packed.device().is_cpu() &&
                        w_packed.numel() >= kPackHeaderBytes,
                    "w_packed: expected a contiguous 1-D CPU uint8 tensor from a fastdistill pack op, got shape ",
                    w_packed.sizes(), " on ", w_packed.device());
  PackHeader h;
  std::memcpy(&h, w_packed.data_ptr<uint8_t>(), sizeof h);
  TORCH_CHECK_VALUE(h.magic == kPackMagic, "w_packed: not a fastdistill packed weight (bad magic)");
  TORCH_CHECK_VALUE(h.version == kPackVersion, "w_packed: packed by format version ", h.version,
                    ", this build reads version ", kPackVersion, ": re-pack it from the int8 weight");
  TORCH_CHECK_VALUE(h.kind == uint32_t(kind), "w_packed: packed for ", pack_kind_name(h.kind), ", used as ",
                    pack_kind_name(uint32_t(kind)));
  TORCH_CHECK_VALUE(h.layout == layout, "w_packed: packed in layout ", h.layout, ", this CPU's kernel reads layout ",
                    layout, " (packed on another ISA or build): re-pack it from the int8 weight");
  TORCH_CHECK_VALUE(w_packed.numel() == kPackHeaderBytes + h.payload_bytes, "w_packed: ", w_packed.numel(),
                    " bytes, its header says ", kPackHeaderBytes + h.payload_bytes, " (truncated or corrupted)");
  TORCH_CHECK_VALUE(k < 0 || h.k == k, "w_packed: packed for K = ", h.k, " (weight [", h.n, ", ", h.k,
                    "]), the input has K = ", k);
  TORCH_CHECK_VALUE(n < 0 || h.n == n, "w_packed: packed for N = ", h.n, " (weight [", h.n, ", ", h.k,
                    "]), the scales give N = ", n);
  return h;
}

inline const uint8_t* packed_payload(const at::Tensor& w_packed) {
  return w_packed.data_ptr<uint8_t>() + kPackHeaderBytes;
}
inline uint8_t* packed_payload_mut(at::Tensor& w_packed) {
  return w_packed.data_ptr<uint8_t>() + kPackHeaderBytes;
}

}  // namespace fastdistill
