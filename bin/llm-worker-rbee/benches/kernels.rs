//! One thread, one kernel: the matrix products at the default model's
//! shapes (one input row: GEMV, weight bytes per second; 64 and 256 rows:
//! GEMM, multiply-adds per second), activation quantization and attention.
//! Run by hand: `cargo bench -p llm-worker-rbee --bench kernels`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput};
use llm_worker_rbee::kernels::acts::{quantize_row, ActBlock, BLOCK};
use llm_worker_rbee::kernels::math::{attention, Attention, KvRows};
use llm_worker_rbee::kernels::matmul::{matmul_group, Input};
use llm_worker_rbee::kernels::packed::{PackedMatrix, SourceType, GROUP};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn packed(dtype: GgmlDType, rows: usize, k: usize) -> PackedMatrix {
    let t = Tensor::from_vec(values(rows * k, 7), (rows, k), &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&t, dtype).expect("quantize");
    let source = match dtype {
        GgmlDType::Q4_0 => SourceType::Q4_0,
        GgmlDType::Q4_1 => SourceType::Q4_1,
        GgmlDType::Q8_0 => SourceType::Q8_0,
        GgmlDType::Q4K => SourceType::Q4K,
        _ => SourceType::Q6K,
    };
    PackedMatrix::pack(source, &q.data().expect("data"), rows, k).expect("pack")
}

fn products(c: &mut Criterion) {
    // (name, type, rows, k) of the default model, plus the K-quants at a
    // shape they fit (FFN down).
    let shapes = [
        ("attn_q", GgmlDType::Q4_1, 576, 576),
        ("attn_kv", GgmlDType::Q4_1, 192, 576),
        ("ffn_gate_up", GgmlDType::Q4_1, 1536, 576),
        ("ffn_down", GgmlDType::Q4_1, 576, 1536),
        ("head", GgmlDType::Q8_0, 49152, 576),
        ("ffn_down_q4_0", GgmlDType::Q4_0, 576, 1536),
        ("ffn_down_q4k", GgmlDType::Q4K, 576, 1536),
        ("ffn_down_q6k", GgmlDType::Q6K, 576, 1536),
    ];
    let mut group = c.benchmark_group("matmul");
    group.sample_size(20);
    for (name, dtype, rows, k) in shapes {
        let w = packed(dtype, rows, k);
        for m in [1usize, 8, 64, 256] {
            if name == "head" && m > 1 {
                continue;
            }
            let x = values(m * k, 3);
            let mut a = vec![ActBlock::default(); m * k / BLOCK];
            for (x, a) in x.chunks_exact(k).zip(a.chunks_exact_mut(k / BLOCK)) {
                quantize_row(x, a);
            }
            let mut out = vec![[0f32; GROUP]; m];
            if m == 1 {
                group.throughput(Throughput::Bytes(w.size_bytes() as u64));
            } else {
                group.throughput(Throughput::Elements((m * rows * k) as u64));
            }
            group.bench_function(BenchmarkId::new(name, format!("m{m}")), |b| {
                b.iter(|| {
                    for g in 0..w.groups() {
                        matmul_group(&w, g, Input::Quantized(&a), &mut out);
                    }
                    out[0][0]
                });
            });
        }
    }
    group.finish();
}

fn activations(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantize");
    let x = values(1536, 5);
    let mut a = vec![ActBlock::default(); 1536 / BLOCK];
    group.throughput(Throughput::Elements(1536));
    group.bench_function("row_1536", |b| {
        b.iter(|| {
            quantize_row(&x, &mut a);
            a[0].d
        });
    });
    group.finish();
}

fn attend(c: &mut Criterion) {
    // One key/value head of the default model (3 query heads of 64) over a
    // run of 128 positions: one row (decode) or 4 rows of a prompt chunk,
    // which share every key and value load.
    use llm_worker_rbee::kernels::math::partial_len;
    let mut group = c.benchmark_group("attention");
    let (hd, heads, run) = (64, 3, 128);
    let keys = values(run * hd, 2);
    let vals = values(run * hd, 3);
    let keys16: Vec<u16> = keys
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    let vals16: Vec<u16> = vals
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    for rows in [1usize, 4] {
        let q = values(rows * heads * hd, 1);
        let positions = vec![run; rows];
        let mut scores = vec![0f32; rows * heads * run];
        let mut part = vec![0f32; rows * partial_len(heads, hd)];
        group.throughput(Throughput::Elements((2 * rows * heads * run * hd) as u64));
        for (kind, k, v) in [
            ("f32", KvRows::F32(&keys), KvRows::F32(&vals)),
            ("f16", KvRows::F16(&keys16), KvRows::F16(&vals16)),
        ] {
            let a = Attention {
                q: &q,
                q_stride: heads * hd,
                heads,
                keys: k,
                values: v,
                head_dim: hd,
                positions: &positions,
                scale: 0.125,
            };
            group.bench_function(BenchmarkId::new(kind, format!("rows{rows}")), |b| {
                b.iter(|| {
                    attention(&a, &mut scores, &mut part);
                    part[0]
                });
            });
        }
    }
    group.finish();
}

fn pool_run(c: &mut Criterion) {
    let mut pool = llm_worker_rbee::kernels::pool::ThreadPool::new(2).expect("pool");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    c.bench_function("pool/run_2_threads_empty", |b| {
        b.iter(|| {
            pool.run(&|_| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        });
    });
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    products(&mut criterion);
    activations(&mut criterion);
    attend(&mut criterion);
    pool_run(&mut criterion);
    criterion.final_summary();
}
