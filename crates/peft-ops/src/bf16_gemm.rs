//! f32 matmuls against frozen weights, computed with bf16 inputs and f32 accumulation on CPUs
//! with AVX512-BF16 (`vdpbf16ps`, twice the multiply rate of f32 FMA): the CPU counterpart of
//! PyTorch's CPU autocast to bf16, which TRL's `bf16=True` turns on.
//!
//! Off unless [`set_bf16_matmul`] turns it on; everything else computes in f32. Both operands
//! are rounded to bf16 (round to nearest even) while they are packed, so the weights stay f32
//! in memory and no second copy is kept.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static BF16_MATMUL: AtomicBool = AtomicBool::new(false);

/// Computes frozen-weight matmuls of f32 tensors on the CPU in bf16 (f32 accumulation) when
/// `on` and the CPU has AVX512-BF16. Returns whether bf16 matmuls are now in effect.
pub fn set_bf16_matmul(on: bool) -> bool {
    let on = on && bf16_supported();
    BF16_MATMUL.store(on, Ordering::Relaxed);
    on
}

/// Whether frozen-weight matmuls of f32 CPU tensors compute in bf16.
pub fn bf16_matmul_enabled() -> bool {
    BF16_MATMUL.load(Ordering::Relaxed)
}

/// Whether this CPU can run the bf16 kernel.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x · wᵀ` (`transposed`, the forward of a linear layer: `x` `[m, in]`, `w` `[out, in]`) or
/// `x · w` (its input gradient: `x` `[m, out]`, `w` `[out, in]`), in bf16 when enabled.
pub fn frozen_matmul(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    if transposed {
        batched_matmul(x, &w.t()?)
    } else {
        batched_matmul(x, w)
    }
}

/// Whether [`batched_matmul`] computes `a · b` with the bf16 kernel rather than candle's matmul.
pub(crate) fn bf16_gemm_serves(a: &Tensor, b: &Tensor) -> bool {
    let rank = a.rank();
    // Packing `b` costs about as much as `MIN_ROWS` rows of compute: decoding one token at a
    // time stays in f32.
    bf16_matmul_enabled()
        && rank >= 2
        && b.rank() == rank
        && matches!(a.device(), Device::Cpu)
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims()[..rank - 2] == b.dims()[..rank - 2]
        && a.dims()[rank - 2] >= MIN_ROWS
}

/// `a · b` over leading batch dims (`a` `[.., m, k]`, `b` `[.., k, n]`, same batch dims), in
/// bf16 when enabled (attention under CPU autocast), else candle's f32 matmul. Either operand
/// may be a transposed view (`kᵀ`, `pᵀ`): it is packed from either layout without a copy.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !bf16_gemm_serves(a, b) {
        return a.matmul(b);
    }
    let rank = a.rank();
    let (m, k) = (a.dims()[rank - 2], a.dims()[rank - 1]);
    let n = b.dims()[rank - 1];
    if b.dims()[rank - 2] != k {
        candle_core::bail!("batched matmul: {:?} times {:?}", a.shape(), b.shape());
    }
    let batch: usize = a.dims()[..rank - 2].iter().product();
    let mut dims = a.dims().to_vec();
    dims[rank - 1] = n;
    let (a, a_transposed) = stored(a)?;
    let (b, b_transposed) = stored(b)?;
    let b_layout = if b_transposed {
        Weight::Rows
    } else {
        Weight::Cols
    };
    let mut out = Vec::with_capacity(batch * m * n);
    with_cpu_f32(&a, |a| {
        with_cpu_f32(&b, |b| {
            out.spare_capacity_mut()
                .par_chunks_mut(m * n)
                .zip(a.par_chunks(m * k).zip(b.par_chunks(k * n)))
                .for_each(|(out, (a, b))| match PackedB::new(b, k, n, b_layout) {
                    Some(packed) => packed.matmul_into_from(a, a_transposed, m, out),
                    None => unreachable!("bf16 matmuls are enabled only where supported"),
                });
            Ok(())
        })
    })?;
    // SAFETY: every batch wrote its m·n values.
    unsafe { out.set_len(batch * m * n) };
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// A matrix operand `t` (`[.., rows, cols]`) as contiguous storage, and whether that storage
/// holds `t` transposed. A transposed view of a contiguous tensor is used as it is stored;
/// only other layouts are copied.
fn stored(t: &Tensor) -> Result<(Tensor, bool)> {
    let rank = t.rank();
    if t.is_contiguous() {
        return Ok((t.clone(), false));
    }
    let tt = t.transpose(rank - 2, rank - 1)?;
    if tt.is_contiguous() {
        Ok((tt, true))
    } else {
        Ok((t.contiguous()?, false))
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, without copying them.
pub(crate) fn with_cpu_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor");
    };
    f(crate::cpu_f32(cpu, layout)?)
}

/// How the weight holds `b` of `a · b`, `b` being `[k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// `w` is `[n, k]`, `b = wᵀ`.
    Rows,
    /// `w` is `[k, n]`, `b = w`.
    Cols,
}

/// Fewest rows of `a` that [`batched_matmul`] computes in bf16.
const MIN_ROWS: usize = 32;
/// Rows of `a` per micro-tile.
const MR: usize = 12;
/// Columns per micro-tile: two AVX-512 registers of f32.
const NR: usize = 32;
/// Micro-tiles of rows and of columns per parallel task (A block and B panels stay in L2).
const M_TILES: usize = 8;
const N_PANELS: usize = 4;

/// `a · b` with `a` `[m, k]` row-major and `b` `[k, n]` given by `w` and `layout`, rounded to
/// bf16 and accumulated in f32. Falls back to f32 on CPUs without AVX512-BF16.
pub fn gemm_bf16(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, layout: Weight) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "a is not [m, k]");
    match PackedB::new(w, k, n, layout) {
        Some(b) => {
            let mut out = Vec::with_capacity(m * n);
            b.matmul_into(a, m, out.spare_capacity_mut());
            // SAFETY: `matmul_into` wrote all m·n values.
            unsafe { out.set_len(m * n) };
            out
        }
        None => reference(a, m, k, w, n, layout, false),
    }
}

/// `b` `[k, n]` in bf16, packed for the kernel once and reused for many `a` (the output head
/// over chunks of rows).
pub struct PackedB {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    panels: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `b` (given by `w` and `layout`); `None` on CPUs without AVX512-BF16.
    pub fn new(w: &[f32], k: usize, n: usize, layout: Weight) -> Option<Self> {
        assert_eq!(w.len(), k * n, "w does not hold k·n values");
        #[cfg(target_arch = "x86_64")]
        if bf16_supported() {
            // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked above).
            let panels = unsafe { x86::pack_b(w, k, n, layout) };
            return Some(Self { panels, k, n });
        }
        None
    }

    /// Columns of `b`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Writes `a · b` (`a` `[m, k]` row-major) to `out` (`m · n` values, all written).
    pub fn matmul_into(&self, a: &[f32], m: usize, out: &mut [std::mem::MaybeUninit<f32>]) {
        self.matmul_into_from(a, false, m, out)
    }

    /// [`Self::matmul_into`] for `a` stored row-major as `[m, k]`, or as its transpose
    /// `[k, m]` when `a_transposed`.
    pub fn matmul_into_from(
        &self,
        a: &[f32],
        a_transposed: bool,
        m: usize,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        assert_eq!(a.len(), m * self.k, "a does not hold m·k values");
        assert!(out.len() >= m * self.n, "output too small");
        if m == 0 || self.n == 0 {
            return;
        }
        if self.k == 0 {
            out[..m * self.n].fill(std::mem::MaybeUninit::new(0.0));
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `PackedB` exists only where the CPU has AVX512-BF16.
        unsafe {
            x86::gemm(a, a_transposed, m, self, out.as_mut_ptr() as *mut f32)
        }
    }
}

/// Plain triple loop in f32, on bf16-rounded inputs when `round`: what [`gemm_bf16`] computes,
/// up to the order of the f32 sums.
pub fn reference(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    layout: Weight,
    round: bool,
) -> Vec<f32> {
    let r = |v: f32| if round { bf16_round(v) } else { v };
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for (j, o) in row.iter_mut().enumerate() {
                let mut s = 0f32;
                for p in 0..k {
                    let b = match layout {
                        Weight::Rows => w[j * k + p],
                        Weight::Cols => w[p * n + j],
                    };
                    s += r(a[i * k + p]) * r(b);
                }
                *o = s;
            }
        });
    out
}

/// bf16 bits of `v`, rounded to nearest even (NaN stays NaN).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to bf16 and back.
pub fn bf16_round(v: f32) -> f32 {
    f32::from_bits((bf16_bits(v) as u32) << 16)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{bf16_bits, PackedB, Weight, MR, M_TILES, NR, N_PANELS};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// A pointer that parallel tasks write disjoint parts of an output through.
    struct Out<T>(*mut T);
    impl<T> Clone for Out<T> {
        fn clone(&self) -> Self {
            *self
        }
    }
    impl<T> Copy for Out<T> {}
    unsafe impl<T> Send for Out<T> {}
    unsafe impl<T> Sync for Out<T> {}

    impl<T> Out<T> {
        /// The element `offset` past the start (a method, so closures capture the whole `Out`).
        fn at(&self, offset: usize) -> *mut T {
            self.0.wrapping_add(offset)
        }
    }

    /// `out = a · b` (`m × b.n`, row-major; `a` stored `[m, k]`, or `[k, m]` when
    /// `a_transposed`); writes every value.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn gemm(a: &[f32], a_transposed: bool, m: usize, b: &PackedB, out: *mut f32) {
        let (k, n) = (b.k, b.n);
        let pairs = k.div_ceil(2);
        // Pair `p` of row `i` sits at `i · row_stride + p · pair_stride`; a tile of MR rows
        // starts at `tile · MR · pairs` in both layouts.
        let (a16, row_stride, pair_stride) = if a_transposed {
            // Row tiles of `a` are the column panels of the stored `aᵀ` (`[k, m]`).
            (unsafe { pack_panels::<MR>(a, k, m, Weight::Cols) }, 1, MR)
        } else {
            // Rows convert in place, contiguous in and out.
            let rows = crate::par_build(m * pairs, pairs, |row, dst: &mut [u32]| unsafe {
                row_to_bf16(&a[row * k..(row + 1) * k], dst)
            });
            (rows, pairs, 1)
        };
        let a_at = AStrides {
            row: row_stride,
            pair: pair_stride,
        };
        let panels = n.div_ceil(NR);
        let c = Out(out);
        let m_tiles = m.div_ceil(MR);
        let tasks_m = m_tiles.div_ceil(M_TILES);
        let tasks_n = panels.div_ceil(N_PANELS);
        (0..tasks_m * tasks_n).into_par_iter().for_each(|t| {
            let (tm, tn) = (t / tasks_n, t % tasks_n);
            for panel in tn * N_PANELS..((tn + 1) * N_PANELS).min(panels) {
                let bp = b.panels[panel * pairs * NR..].as_ptr();
                let cols = NR.min(n - panel * NR);
                for tile in tm * M_TILES..((tm + 1) * M_TILES).min(m_tiles) {
                    let row = tile * MR;
                    let rows = MR.min(m - row);
                    let a = a16[tile * MR * pairs..].as_ptr();
                    let c = c.at(row * n + panel * NR);
                    // SAFETY: each (tile, panel) is written by exactly one task.
                    unsafe { tile_kernel(rows, a, a_at, pairs, bp, c, n, cols) };
                }
            }
        });
    }

    /// Where packed `a` keeps row `i`, pair `p`: at `i · row + p · pair`.
    #[derive(Clone, Copy)]
    struct AStrides {
        row: usize,
        pair: usize,
    }

    /// `src` f32 to bf16 pairs in `dst` (`src.len().div_ceil(2)` u32).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn row_to_bf16(src: &[f32], dst: &mut [u32]) {
        let mut i = 0;
        while i + 32 <= src.len() {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(i / 2) as *mut _, v);
            i += 32;
        }
        while i < src.len() {
            let lo = bf16_bits(src[i]) as u32;
            let hi = src.get(i + 1).map_or(0, |&v| bf16_bits(v) as u32);
            dst[i / 2] = lo | (hi << 16);
            i += 2;
        }
    }

    /// `b` `[k, n]` packed for the kernel (see [`pack_panels`]) in panels of `NR` columns.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn pack_b(w: &[f32], k: usize, n: usize, layout: Weight) -> Vec<u32> {
        unsafe { pack_panels::<NR>(w, k, n, layout) }
    }

    /// `b` `[k, n]` (from `w` as `layout` says) to panels of `W` columns, each `[pairs, W]`
    /// u32: lane `j` of pair `p` holds `b[2p][j]` (low half) and `b[2p+1][j]`; lanes past `n`
    /// are zero.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn pack_panels<const W: usize>(
        w: &[f32],
        k: usize,
        n: usize,
        layout: Weight,
    ) -> Vec<u32> {
        match layout {
            Weight::Rows => unsafe { pack_rows::<W>(w, k, n) },
            Weight::Cols => unsafe { pack_cols::<W>(w, k, n) },
        }
    }

    /// [`pack_panels`] of `b = wᵀ` (`w` `[n, k]`): a panel is `W` consecutive rows of `w`,
    /// converted 16 rows × 32 values at a time and transposed in registers (a strided store
    /// per value packed a 576 × 576 weight at 2.6 GB/s, this at about 10).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn pack_rows<const W: usize>(w: &[f32], k: usize, n: usize) -> Vec<u32> {
        let pairs = k.div_ceil(2);
        // Whole blocks of 32 values along k (16 pairs) go through the transpose.
        let blocks = if W.is_multiple_of(16) { k / 32 } else { 0 };
        crate::par_build(
            n.div_ceil(W) * pairs * W,
            pairs * W,
            |panel, dst: &mut [u32]| {
                let col0 = panel * W;
                let cols = W.min(n - col0);
                let mut row = vec![0u32; pairs];
                for j0 in (0..cols).step_by(16) {
                    let rows = 16.min(cols - j0);
                    let done = if rows == 16 {
                        for block in 0..blocks {
                            let mut v = [_mm512_setzero_si512(); 16];
                            for (r, v) in v.iter_mut().enumerate() {
                                let src = w.as_ptr().add((col0 + j0 + r) * k + 32 * block);
                                let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                                *v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                                    hi, lo,
                                ));
                            }
                            // v[r] lane q: pair 16·block + q of column j0 + r; stored transposed.
                            transpose_16x16(&mut v);
                            for (q, v) in v.iter().enumerate() {
                                let at = (16 * block + q) * W + j0;
                                _mm512_storeu_si512(dst.as_mut_ptr().add(at) as *mut _, *v);
                            }
                        }
                        16 * blocks
                    } else {
                        0
                    };
                    // The rest (a tail of k, or fewer than 16 columns): pair by pair.
                    if done < pairs {
                        let row = &mut row[..pairs - done];
                        for j in j0..j0 + rows {
                            unsafe {
                                row_to_bf16(&w[(col0 + j) * k + 2 * done..(col0 + j + 1) * k], row)
                            };
                            for (p, &v) in row.iter().enumerate() {
                                dst[(done + p) * W + j] = v;
                            }
                        }
                    }
                }
            },
        )
    }

    /// [`pack_panels`] of `b = w` (`w` `[k, n]`), in parallel over blocks of rows of `w`: each
    /// pair of rows is converted once, whole, and its `W`-wide pieces copied to the panels (a
    /// task per panel, converting `W` values at a time, took 12% of a training step).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn pack_cols<const W: usize>(w: &[f32], k: usize, n: usize) -> Vec<u32> {
        const PAIRS_PER_TASK: usize = 32;
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(W);
        let mut out = Vec::with_capacity(panels * pairs * W);
        let dst = Out(out.as_mut_ptr());
        (0..pairs.div_ceil(PAIRS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let mut pair_row = vec![0u32; n];
                for p in task * PAIRS_PER_TASK..pairs.min((task + 1) * PAIRS_PER_TASK) {
                    let r0 = &w[2 * p * n..(2 * p + 1) * n];
                    let r1 = (2 * p + 1 < k).then(|| &w[(2 * p + 1) * n..(2 * p + 2) * n]);
                    unsafe { interleave(r0, r1, &mut pair_row) };
                    for (panel, piece) in pair_row.chunks(W).enumerate() {
                        let at = dst.at(panel * pairs * W + p * W);
                        // SAFETY: pair p of each panel (W lanes, those past `n` zero) is
                        // written by this task alone, within `out` (panel < panels, p < pairs).
                        unsafe {
                            std::ptr::copy_nonoverlapping(piece.as_ptr(), at, piece.len());
                            std::ptr::write_bytes(at.add(piece.len()), 0, W - piece.len());
                        };
                    }
                }
            });
        // SAFETY: the tasks wrote every lane of every pair of every panel.
        unsafe { out.set_len(panels * pairs * W) };
        out
    }

    /// Transposes the 16 × 16 u32 matrix whose rows are `v`: 32-bit, then 64-bit interleaves
    /// within 128-bit lanes, then a 4 × 4 transpose of those lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_16x16(v: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        // u[4g + c], lane L: column 4L + c of rows 4g..4g + 4.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let (t0, t1, t2, t3) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        // Row 4L + c of the result takes lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        for c in 0..4 {
            let (x0, x1, x2, x3) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
            let y0 = _mm512_shuffle_i32x4::<0x44>(x0, x1);
            let y1 = _mm512_shuffle_i32x4::<0xEE>(x0, x1);
            let y2 = _mm512_shuffle_i32x4::<0x44>(x2, x3);
            let y3 = _mm512_shuffle_i32x4::<0xEE>(x2, x3);
            v[c] = _mm512_shuffle_i32x4::<0x88>(y0, y2);
            v[4 + c] = _mm512_shuffle_i32x4::<0xDD>(y0, y2);
            v[8 + c] = _mm512_shuffle_i32x4::<0x88>(y1, y3);
            v[12 + c] = _mm512_shuffle_i32x4::<0xDD>(y1, y3);
        }
    }

    /// `d[j] = bf16(r0[j]) | bf16(r1[j]) << 16` (`r1` absent: zero), 16 lanes at a time with
    /// a masked tail.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn interleave(r0: &[f32], r1: Option<&[f32]>, d: &mut [u32]) {
        let mut j = 0;
        while j < d.len() {
            let len = (d.len() - j).min(16);
            let mask: __mmask16 = if len == 16 { 0xffff } else { (1 << len) - 1 };
            let half = |r: &[f32]| -> __m512i {
                let v = _mm512_maskz_loadu_ps(mask, r.as_ptr().add(j));
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(v),
                ))
            };
            let mut v = half(r0);
            if let Some(r1) = r1 {
                v = _mm512_or_si512(v, _mm512_slli_epi32::<16>(half(r1)));
            }
            _mm512_mask_storeu_epi32(d.as_mut_ptr().add(j) as *mut _, mask, v);
            j += 16;
        }
    }

    /// One `rows × cols` tile of `c` (row stride `ldc`) from one packed row tile of `a` and one
    /// packed panel of `b`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_kernel(
        rows: usize,
        a: *const u32,
        a_at: AStrides,
        pairs: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    $($r => micro::<$r>(a, a_at, pairs, b, c, ldc, cols),)*
                    _ => unreachable!("at most MR rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    unsafe fn micro<const ROWS: usize>(
        a: *const u32,
        a_at: AStrides,
        pairs: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc0 = [_mm512_setzero_ps(); ROWS];
        let mut acc1 = [_mm512_setzero_ps(); ROWS];
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            for i in 0..ROWS {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                    *a.add(i * a_at.row + p * a_at.pair) as i32,
                ));
                acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
                acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
            }
        }
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols) - 1
        };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        for i in 0..ROWS {
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, acc0[i]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, acc1[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |d, (x, y)| d.max((x - y).abs())) / scale
    }

    /// Odd and ragged sizes hit every edge: partial row tiles, partial panels, odd k.
    #[test]
    fn bf16_gemm_matches_reference_on_rounded_inputs() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 33),
            (25, 64, 100),
            (40, 577, 70),
            (100, 96, 16),
        ] {
            for layout in [Weight::Rows, Weight::Cols] {
                let a = random(m * k, 1);
                let w = random(k * n, 2);
                let got = gemm_bf16(&a, m, k, &w, n, layout);
                let want = reference(&a, m, k, &w, n, layout, bf16_supported());
                let d = max_rel_diff(&got, &want);
                assert!(
                    d < 1e-5,
                    "{m}x{k}x{n} {layout:?}: differs by {d} (relative)"
                );
                // bf16 rounding itself moves results by about 2^-9 relative to f32.
                if bf16_supported() && k > 16 {
                    let exact = reference(&a, m, k, &w, n, layout, false);
                    let d = max_rel_diff(&got, &exact);
                    assert!(d > 1e-5 && d < 2e-2, "{m}x{k}x{n}: bf16 vs f32 {d}");
                }
            }
        }
    }

    /// `a` stored transposed (`pᵀ` in the attention backward) gives the same product.
    #[test]
    fn transposed_a_matches_row_major_a() {
        for &(m, k, n) in &[(13, 7, 33), (40, 577, 70), (256, 64, 64)] {
            let a = random(m * k, 3);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let w = random(k * n, 4);
            let Some(b) = PackedB::new(&w, k, n, Weight::Cols) else {
                return;
            };
            let mut got = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
            b.matmul_into_from(&at, true, m, &mut got);
            // SAFETY: initialised above.
            let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
            let want = reference(&a, m, k, &w, n, Weight::Cols, true);
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-5, "{m}x{k}x{n}: differs by {d} (relative)");
        }
    }

    /// The packed panels, value for value, against a plain loop: full 32-value blocks and
    /// their tails along k, 16-column groups and narrower panels, tall weights over many tasks.
    #[test]
    fn packing_matches_a_plain_loop() {
        if !bf16_supported() {
            return;
        }
        for &(k, n) in &[
            (1, 1),
            (7, 33),
            (64, 100),
            (577, 70),
            (96, 16),
            (1000, 300),
            (2048, 48),
            (64, 40),
            (130, 1),
        ] {
            for layout in [Weight::Rows, Weight::Cols] {
                let w = random(k * n, 5);
                let b = |r: usize, c: usize| -> u32 {
                    if r >= k {
                        return 0;
                    }
                    bf16_bits(match layout {
                        Weight::Rows => w[c * k + r],
                        Weight::Cols => w[r * n + c],
                    }) as u32
                };
                let pairs = k.div_ceil(2);
                let mut want = vec![0u32; n.div_ceil(NR) * pairs * NR];
                for (i, v) in want.iter_mut().enumerate() {
                    let (panel, p, j) = (i / (pairs * NR), i / NR % pairs, i % NR);
                    let c = panel * NR + j;
                    if c < n {
                        *v = b(2 * p, c) | b(2 * p + 1, c) << 16;
                    }
                }
                let got = PackedB::new(&w, k, n, layout).expect("bf16 supported");
                assert!(
                    got.panels == want,
                    "k {k} n {n} {layout:?}: packing differs"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose_16x16_transposes() {
        if !bf16_supported() {
            return;
        }
        use std::arch::x86_64::*;
        let m: Vec<u32> = (0..256).collect();
        // SAFETY: AVX512F is present (checked above); loads and stores stay within `m`/`out`.
        let out = unsafe {
            let mut v: [__m512i; 16] =
                std::array::from_fn(|r| _mm512_loadu_si512(m[16 * r..].as_ptr() as *const _));
            x86::transpose_16x16(&mut v);
            let mut out = vec![0u32; 256];
            for (r, v) in v.iter().enumerate() {
                _mm512_storeu_si512(out[16 * r..].as_mut_ptr() as *mut _, *v);
            }
            out
        };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(out[16 * r + c], m[16 * c + r], "({r}, {c})");
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_round(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16_round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert!(bf16_round(f32::NAN).is_nan());
        assert_eq!(bf16_round(f32::INFINITY), f32::INFINITY);
    }
}
