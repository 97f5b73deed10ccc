//! The reference image network: a small U-Net score model (`shared/UNET.md`).

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::mlp::{seeded_linear, seeded_parameter, FourierFeatures};
use super::ScoreModel;
use crate::error::{ensure, ensure_positive};
use crate::kernels::channels;
use crate::kernels::conv::conv2d;
use crate::sde::Sde;
use crate::{Error, Result};

/// Configuration of [`UNetScore`]. The default is the reference network of
/// `shared/UNET.md` (and of the PyTorch peer `torch_unet.py`): 1×28×28 images, widths
/// 32/64/64 at 28/14/7 pixels, one residual block per level and side, 128 Fourier time
/// features of scale 16, GroupNorm with 8 groups; 706,849 parameters.
///
/// ```
/// let config = scoresde::score::UNetConfig::default();
/// assert_eq!((config.image_channels, config.height, config.width), (1, 28, 28));
/// assert_eq!(config.widths, [32, 64, 64]);
/// // A smaller network for 3×32×32 images:
/// let small = scoresde::score::UNetConfig { image_channels: 3, height: 32, width: 32, widths: vec![16, 32], ..Default::default() };
/// assert_eq!(small.blocks_per_level, 1);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Channels of the images (1 for grey, 3 for colour).
    pub image_channels: usize,
    /// Image height; divisible by `2^(levels − 1)`.
    pub height: usize,
    /// Image width; divisible by `2^(levels − 1)`.
    pub width: usize,
    /// Channels of each resolution level, finest first; each divisible by `groups`.
    /// Level `i + 1` has half the resolution of level `i`.
    pub widths: Vec<usize>,
    /// Residual blocks per level on each side of the U.
    pub blocks_per_level: usize,
    /// Fourier time features, which is also the width of the time embedding (even).
    pub time_features: usize,
    /// Standard deviation of the Fourier frequencies.
    pub fourier_scale: f64,
    /// Groups of every GroupNorm.
    pub groups: usize,
    /// Seed of the initial weights and of the Fourier frequencies.
    pub seed: u64,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            image_channels: 1,
            height: 28,
            width: 28,
            widths: vec![32, 64, 64],
            blocks_per_level: 1,
            time_features: 128,
            fourier_scale: 16.0,
            groups: 8,
            seed: 0,
        }
    }
}

impl UNetConfig {
    fn validate(&self) -> Result<()> {
        let levels = self.widths.len();
        ensure(levels > 0 && self.widths.iter().all(|&w| w > 0), || {
            format!(
                "UNetConfig.widths must hold at least one positive width, got {:?}",
                self.widths
            )
        })?;
        ensure(
            self.image_channels > 0 && self.blocks_per_level > 0 && self.groups > 0,
            || "UNetConfig: image_channels, blocks_per_level and groups must be > 0".into(),
        )?;
        ensure(self.widths.iter().all(|w| w % self.groups == 0), || {
            format!(
                "UNetConfig: every width must be divisible by groups = {}, got {:?}",
                self.groups, self.widths
            )
        })?;
        let factor = 1usize
            .checked_shl(levels as u32 - 1)
            .filter(|f| *f <= self.height.min(self.width));
        ensure(
            self.height > 0
                && self.width > 0
                && factor.is_some_and(|f| self.height % f == 0 && self.width % f == 0),
            || {
                format!(
                    "UNetConfig: with {levels} levels the image size must be divisible by 2^{}, got {}×{}",
                    levels - 1,
                    self.height,
                    self.width
                )
            },
        )?;
        ensure_positive("UNetConfig.fourier_scale", self.fourier_scale)
    }
}

/// A convolution with a square kernel on `[B, C, H, W]` activations.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// PyTorch's `nn.Conv2d` initialization: weight and bias `~ U(−1/√fan_in, 1/√fan_in)`,
    /// `fan_in = c_in·k²`.
    fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let fan_in = c_in * kernel * kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let weight_values = draw(c_out * fan_in);
        let bias_values = draw(c_out);
        Ok(Self {
            weight: seeded_parameter(&vb, &[c_out, c_in, kernel, kernel], "weight", weight_values)?,
            bias: seeded_parameter(&vb, &[c_out], "bias", bias_values)?,
            stride,
            padding: kernel / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
        )?)
    }
}

/// GroupNorm (ε = 1e-5, learned affine) on `[B, C, H, W]`, differentiable to any order.
#[derive(Debug, Clone)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            weight: seeded_parameter(&vb, &[channels], "weight", vec![1.0; channels])?,
            bias: seeded_parameter(&vb, &[channels], "bias", vec![0.0; channels])?,
            groups,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = channels::group_normalize(x, self.groups, 1e-5)?;
        Ok(channels::add_bias(
            &channels::scale(&normed, &self.weight)?,
            &self.bias,
        )?)
    }
}

fn silu(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::silu_supported(x) {
        crate::kernels::silu(x)
    } else {
        Ok(x.silu()?)
    }
}

/// `(skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time(e)))))/√2`.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv,
    time: Linear,
    norm2: GroupNorm,
    conv2: Conv,
    skip: Option<Conv>,
}

impl ResBlock {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, config: &UNetConfig, rng: &mut StdRng) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), c_in, config.groups)?,
            conv1: Conv::new(vb.pp("conv1"), c_in, c_out, 3, 1, rng)?,
            time: seeded_linear(vb.pp("time"), config.time_features, c_out, rng)?,
            norm2: GroupNorm::new(vb.pp("norm2"), c_out, config.groups)?,
            conv2: Conv::new(vb.pp("conv2"), c_out, c_out, 3, 1, rng)?,
            skip: if c_in == c_out {
                None
            } else {
                Some(Conv::new(vb.pp("skip"), c_in, c_out, 1, 1, rng)?)
            },
        })
    }

    /// `x: [B, C, H, W]`, `e: [B, E]`.
    fn forward(&self, x: &Tensor, e: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        let h = h.broadcast_add(&self.time.forward(e)?.unsqueeze(2)?.unsqueeze(3)?)?;
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.skip {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        Ok(((skip + h)? * std::f64::consts::FRAC_1_SQRT_2)?)
    }
}

/// Nearest-neighbour upsampling by 2 on `[B, C, H, W]`, as a broadcast (whose backward is
/// a sum, differentiable to any order; candle's `upsample_nearest2d` backward is a grouped
/// convolution that overwrites the gradient of its input).
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// A U-Net score model for images: `s(x, t) = UNet(x, t)/σ(t)`, the reference image
/// network of `shared/UNET.md` by default ([`UNetConfig`]).
///
/// Residual blocks with GroupNorm and SiLU, a Gaussian Fourier time embedding added in
/// every block, stride-2 convolutions down, nearest-neighbour ×2 and a convolution up, skip
/// connections by concatenation; the output is divided by the SDE's `σ(t)` as in score_sde.
/// `x` has shape `[B, C, H, W]`, `t` shape `[B]`. Built through a [`VarBuilder`] you own,
/// initialized from `config.seed` like PyTorch's defaults; every op is differentiable to
/// the order the Fokker–Planck penalties need (no fused layer-norm or softmax).
///
/// Convolutions, per-channel scales and biases run as fused ops whose backward passes are
/// again such ops (see `docs/design.md`), so training and the penalties' higher
/// derivatives do not go through candle's slow CPU convolution backward.
///
/// Variables: `time.frequencies` (fixed), `time_mlp.{0,1}`, `conv_in`,
/// `down.{level}.{block}` and `up.{level}.{block}` (residual blocks: `norm1`, `conv1`,
/// `time`, `norm2`, `conv2`, `skip` where the width changes), `downsample.{level}`,
/// `mid`, `upsample.{level}`, `norm_out`, `conv_out`, each with `weight` and `bias`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::{UNetConfig, UNetScore};
/// use scoresde::{sde::VpSde, ScoreModel};
///
/// // A tiny instance: 1×8×8 images, widths 8 and 16.
/// let config = UNetConfig { height: 8, width: 8, widths: vec![8, 16], time_features: 16, groups: 4, ..Default::default() };
/// let vars = VarMap::new();
/// let model = UNetScore::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), VpSde::default(), config)?;
/// let x = Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu)?;
/// let t = Tensor::new(&[0.3f32, 0.9], &Device::Cpu)?;
/// assert_eq!(model.score(&x, &t)?.dims(), [2, 1, 8, 8]);
///
/// // The reference network of shared/UNET.md:
/// let vars = VarMap::new();
/// let _unet = UNetScore::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), VpSde::default(), UNetConfig::default())?;
/// let trainable: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum::<usize>() - 64; // minus the fixed frequencies
/// assert_eq!(trainable, 706_849);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct UNetScore<S> {
    sde: S,
    config: UNetConfig,
    time: FourierFeatures,
    time_mlp: [Linear; 2],
    conv_in: Conv,
    down: Vec<Vec<ResBlock>>,
    downsample: Vec<Conv>,
    mid: ResBlock,
    up: Vec<Vec<ResBlock>>,
    upsample: Vec<Conv>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl<S: Sde> UNetScore<S> {
    /// Builds the network in `vb` (creating missing variables from `config.seed`).
    ///
    /// Errors on an invalid configuration: no levels, a width not divisible by `groups`,
    /// an image size not divisible by `2^(levels − 1)`, an odd or zero feature count.
    pub fn new(vb: VarBuilder, sde: S, config: UNetConfig) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let e = config.time_features;
        let time = FourierFeatures::new(vb.pp("time"), e, config.fourier_scale, config.seed)?;
        let time_mlp = [
            seeded_linear(vb.pp("time_mlp.0"), e, e, &mut rng)?,
            seeded_linear(vb.pp("time_mlp.1"), e, e, &mut rng)?,
        ];
        let widths = &config.widths;
        let levels = widths.len();
        let conv_in = Conv::new(vb.pp("conv_in"), config.image_channels, widths[0], 3, 1, &mut rng)?;
        let (mut down, mut downsample) = (Vec::new(), Vec::new());
        let mut current = widths[0];
        for (level, &width) in widths.iter().enumerate() {
            let mut blocks = Vec::new();
            for block in 0..config.blocks_per_level {
                let vb = vb.pp(format!("down.{level}.{block}"));
                blocks.push(ResBlock::new(vb, current, width, &config, &mut rng)?);
                current = width;
            }
            down.push(blocks);
            if level + 1 < levels {
                let vb = vb.pp(format!("downsample.{level}"));
                downsample.push(Conv::new(vb, current, current, 3, 2, &mut rng)?);
            }
        }
        let mid = ResBlock::new(vb.pp("mid"), current, current, &config, &mut rng)?;
        // Built finest level first (so the names read like the down path); run coarsest first.
        let (mut up, mut upsample) = (vec![Vec::new(); levels], Vec::new());
        for level in (0..levels).rev() {
            for block in 0..config.blocks_per_level {
                let vb = vb.pp(format!("up.{level}.{block}"));
                up[level].push(ResBlock::new(
                    vb,
                    current + widths[level],
                    widths[level],
                    &config,
                    &mut rng,
                )?);
                current = widths[level];
            }
            if level > 0 {
                let vb = vb.pp(format!("upsample.{level}"));
                upsample.push(Conv::new(vb, current, current, 3, 1, &mut rng)?);
            }
        }
        let norm_out = GroupNorm::new(vb.pp("norm_out"), current, config.groups)?;
        let conv_out = Conv::new(vb.pp("conv_out"), current, config.image_channels, 3, 1, &mut rng)?;
        Ok(Self {
            sde,
            config,
            time,
            time_mlp,
            conv_in,
            down,
            downsample,
            mid,
            up,
            upsample,
            norm_out,
            conv_out,
        })
    }

    /// The configuration the network was built with.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use scoresde::score::{UNetConfig, UNetScore};
    /// let config = UNetConfig { height: 8, width: 8, widths: vec![8], time_features: 8, groups: 4, ..Default::default() };
    /// let vars = VarMap::new();
    /// let model = UNetScore::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), scoresde::sde::VpSde::default(), config.clone())?;
    /// assert_eq!(model.config(), &config);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    fn check_input(&self, x: &Tensor, t: &Tensor) -> Result<()> {
        let c = &self.config;
        let expected = [c.image_channels, c.height, c.width];
        if x.rank() != 4 || x.dims()[1..] != expected || x.dim(0)? == 0 {
            return Err(Error::Shape(format!(
                "UNetScore was built for images [B, {}, {}, {}] with B > 0, got x of shape {:?}",
                expected[0],
                expected[1],
                expected[2],
                x.dims()
            )));
        }
        if t.dims() != [x.dim(0)?] {
            return Err(Error::Shape(format!(
                "UNetScore expects t of shape [{}], got {:?}",
                x.dim(0)?,
                t.dims()
            )));
        }
        if !x.dtype().is_float() {
            return Err(Error::Shape(format!(
                "UNetScore expects floating-point images, got {:?}",
                x.dtype()
            )));
        }
        super::check_sigma_times(&self.sde, t, "UNetScore")
    }
}

impl<S: Sde> ScoreModel for UNetScore<S> {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.check_input(x, t)?;
        let dtype = self.conv_in.weight.dtype();
        let (x, t) = (x.to_dtype(dtype)?, t.to_dtype(dtype)?);
        let e = self.time_mlp[1].forward(&silu(&self.time_mlp[0].forward(&self.time.forward(&t)?)?)?)?;
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = Vec::new();
        for (level, blocks) in self.down.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h, &e)?;
                skips.push(h.clone());
            }
            if let Some(down) = self.downsample.get(level) {
                h = down.forward(&h)?;
            }
        }
        h = self.mid.forward(&h, &e)?;
        let mut upsample = self.upsample.iter();
        for blocks in self.up.iter().rev() {
            for block in blocks {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Shape("UNetScore: unbalanced skips".into()))?;
                h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &e)?;
            }
            if let Some(up) = upsample.next() {
                h = up.forward(&upsample2(&h)?)?;
            }
        }
        let out = self.conv_out.forward(&silu(&self.norm_out.forward(&h)?)?)?;
        let sigma = self.sde.std_tensor(&t)?.reshape((x.dim(0)?, 1, 1, 1))?;
        crate::error::finite_result(out.broadcast_div(&sigma)?, "UNetScore's score", &[("x", &x)])
    }
}
