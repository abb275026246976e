//! A minimal owned f32 tensor for the CPU reference: a shape and row-major data.
//! It owns nothing else — ops live in `cpu::ops` as plain functions over slices.

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        }
    }
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "Tensor::from_vec: shape {shape:?}"
        );
        Tensor {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Rows and columns of a 2-D tensor.
    pub fn dims2(&self) -> (usize, usize) {
        assert_eq!(self.shape.len(), 2, "expected a 2-D tensor, got {:?}", self.shape);
        (self.shape[0], self.shape[1])
    }
    pub fn row(&self, i: usize) -> &[f32] {
        let c = self.shape[self.shape.len() - 1];
        &self.data[i * c..(i + 1) * c]
    }
}
