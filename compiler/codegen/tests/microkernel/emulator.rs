//! A tiny x86-64 emulator for the instructions the GEMM microkernels use, so the
//! AVX-512 kernel can be checked on a machine without AVX-512. It decodes the
//! kernel's actual bytes, runs them against a memory made of named regions, and
//! fails on any access outside them (the native tests cannot see out-of-bounds
//! reads). FMAs are fused (`f32::mul_add`), exactly like the hardware, so on a
//! machine with AVX2 the emulated AVX2 kernel must agree with the native one bit
//! for bit.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// A block of memory at a fake address.
pub struct Region {
    pub name: &'static str,
    pub base: u64,
    pub data: Vec<f32>,
    pub writable: bool,
}

pub struct Machine {
    gpr: [u64; 16],
    vector: [[f32; 16]; 32],
    zero_flag: bool,
    pub regions: Vec<Region>,
}

const MAX_STEPS: usize = 50_000_000;
/// Where `ret` goes: the emulation stops when rip reaches it.
const RETURN_ADDRESS: u64 = 0xDEAD_0000;

impl Machine {
    pub fn new(regions: Vec<Region>) -> Machine {
        Machine {
            gpr: [0x6666_6666_6666_6666; 16],
            vector: [[f32::NAN; 16]; 32],
            zero_flag: false,
            regions,
        }
    }

    pub fn set_gpr(&mut self, reg: Register, value: u64) {
        self.gpr[gpr_index(reg)] = value;
    }

    pub fn gpr(&self, reg: Register) -> u64 {
        self.gpr[gpr_index(reg)]
    }

    /// Runs `code` (placed at address 0) until it returns; Err says what went wrong.
    pub fn run(&mut self, code: &[u8]) -> Result<(), String> {
        let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
        let program: Vec<Instruction> = decoder.iter().collect();
        let mut at_ip = std::collections::HashMap::new();
        for (i, instr) in program.iter().enumerate() {
            if instr.is_invalid() {
                return Err(format!("undecodable bytes at {:#x}", instr.ip()));
            }
            at_ip.insert(instr.ip(), i);
        }
        let mut ip = 0u64;
        for _ in 0..MAX_STEPS {
            if ip == RETURN_ADDRESS {
                return Ok(());
            }
            let &index = at_ip
                .get(&ip)
                .ok_or_else(|| format!("jump into the middle of an instruction: {ip:#x}"))?;
            let instr = &program[index];
            ip = self
                .step(instr)
                .map_err(|e| format!("at {:#x} ({:?}): {e}", instr.ip(), instr.mnemonic()))?;
        }
        Err(format!("no return after {MAX_STEPS} instructions"))
    }

    /// Executes one instruction; returns the next rip.
    fn step(&mut self, instr: &Instruction) -> Result<u64, String> {
        let next = instr.next_ip();
        match instr.mnemonic() {
            Mnemonic::Nop | Mnemonic::Prefetcht0 => {}
            Mnemonic::Ret => return Ok(RETURN_ADDRESS),
            Mnemonic::Vzeroupper => {
                for v in &mut self.vector[..16] {
                    v[4..].fill(0.0);
                }
            }
            Mnemonic::Lea => {
                let address = self.address(instr);
                self.write_gpr(instr, address);
            }
            Mnemonic::Mov => {
                let value = self.source_integer(instr, 1)?;
                self.write_gpr(instr, value);
            }
            Mnemonic::Shr | Mnemonic::And | Mnemonic::Add | Mnemonic::Dec | Mnemonic::Test => {
                let a = self.gpr[gpr_index(instr.op_register(0))];
                let b = if instr.op_count() > 1 {
                    self.source_integer(instr, 1)?
                } else {
                    1
                };
                let result = match instr.mnemonic() {
                    Mnemonic::Shr => a >> (b & 63),
                    Mnemonic::And | Mnemonic::Test => a & b,
                    Mnemonic::Add => a.wrapping_add(b),
                    _ => a.wrapping_sub(1),
                };
                self.zero_flag = result == 0;
                if instr.mnemonic() != Mnemonic::Test {
                    self.write_gpr(instr, result);
                }
            }
            Mnemonic::Je => {
                return Ok(if self.zero_flag {
                    instr.near_branch_target()
                } else {
                    next
                });
            }
            Mnemonic::Jne => {
                return Ok(if self.zero_flag {
                    next
                } else {
                    instr.near_branch_target()
                });
            }
            Mnemonic::Jmp => return Ok(instr.near_branch_target()),
            Mnemonic::Vxorps | Mnemonic::Vpxord => {
                let (lanes, _) = vector_operand(instr.op_register(0))?;
                self.write_vector(instr.op_register(0), &vec![0.0; lanes]);
            }
            Mnemonic::Vmovups if instr.op_kind(0) == OpKind::Memory => {
                let (lanes, index) = vector_operand(instr.op_register(1))?;
                let values = self.vector[index][..lanes].to_vec();
                self.store(self.address(instr), &values)?;
            }
            Mnemonic::Vmovups => {
                let (lanes, _) = vector_operand(instr.op_register(0))?;
                let values = self.source_vector(instr, 1, lanes)?;
                self.write_vector(instr.op_register(0), &values);
            }
            Mnemonic::Vbroadcastss => {
                let (lanes, _) = vector_operand(instr.op_register(0))?;
                let value = self.load(self.address(instr), 1)?[0];
                self.write_vector(instr.op_register(0), &vec![value; lanes]);
            }
            Mnemonic::Vfmadd231ps => {
                let (lanes, dst) = vector_operand(instr.op_register(0))?;
                let x = self.source_vector(instr, 1, lanes)?;
                let y = self.source_vector(instr, 2, lanes)?;
                let sum: Vec<f32> = (0..lanes).map(|l| x[l].mul_add(y[l], self.vector[dst][l])).collect();
                self.write_vector(instr.op_register(0), &sum);
            }
            Mnemonic::Vaddps => {
                let (lanes, _) = vector_operand(instr.op_register(0))?;
                let x = self.source_vector(instr, 1, lanes)?;
                let y = self.source_vector(instr, 2, lanes)?;
                let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
                self.write_vector(instr.op_register(0), &sum);
            }
            other => return Err(format!("instruction {other:?} is not emulated")),
        }
        Ok(next)
    }

    fn write_gpr(&mut self, instr: &Instruction, value: u64) {
        self.gpr[gpr_index(instr.op_register(0))] = value;
    }

    /// A VEX write to a ymm zeroes the rest of the zmm; EVEX zmm writes all 16 lanes.
    fn write_vector(&mut self, reg: Register, values: &[f32]) {
        let Ok((_, index)) = vector_operand(reg) else {
            unreachable!("callers pass registers vector_operand accepted")
        };
        self.vector[index] = [0.0; 16];
        self.vector[index][..values.len()].copy_from_slice(values);
    }

    fn address(&self, instr: &Instruction) -> u64 {
        let mut address = instr.memory_displacement64();
        if instr.memory_base() != Register::None {
            address = address.wrapping_add(self.gpr[gpr_index(instr.memory_base())]);
        }
        if instr.memory_index() != Register::None {
            let index = self.gpr[gpr_index(instr.memory_index())];
            address = address.wrapping_add(index.wrapping_mul(instr.memory_index_scale() as u64));
        }
        address
    }

    fn source_integer(&self, instr: &Instruction, operand: u32) -> Result<u64, String> {
        match instr.op_kind(operand) {
            OpKind::Register => Ok(self.gpr[gpr_index(instr.op_register(operand))]),
            OpKind::Immediate8
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(instr.immediate(operand)),
            other => Err(format!("integer operand kind {other:?} is not emulated")),
        }
    }

    fn source_vector(&self, instr: &Instruction, operand: u32, lanes: usize) -> Result<Vec<f32>, String> {
        match instr.op_kind(operand) {
            OpKind::Register => {
                let (width, index) = vector_operand(instr.op_register(operand))?;
                if width != lanes {
                    return Err("mixed vector widths".into());
                }
                Ok(self.vector[index][..lanes].to_vec())
            }
            OpKind::Memory if instr.is_broadcast() => Ok(vec![self.load(self.address(instr), 1)?[0]; lanes]),
            OpKind::Memory => self.load(self.address(instr), lanes),
            other => Err(format!("vector operand kind {other:?} is not emulated")),
        }
    }

    fn region_of(&self, address: u64, floats: usize) -> Result<(usize, usize), String> {
        for (r, region) in self.regions.iter().enumerate() {
            let end = region.base + 4 * region.data.len() as u64;
            if address >= region.base && address + 4 * floats as u64 <= end {
                if !(address - region.base).is_multiple_of(4) {
                    return Err(format!("access to {} not on a float boundary", region.name));
                }
                return Ok((r, ((address - region.base) / 4) as usize));
            }
        }
        let near: Vec<String> = self
            .regions
            .iter()
            .map(|r| format!("{} at {:#x}+{}", r.name, r.base, 4 * r.data.len()))
            .collect();
        Err(format!(
            "access to {floats} floats at {address:#x} outside every region ({})",
            near.join(", ")
        ))
    }

    fn load(&self, address: u64, floats: usize) -> Result<Vec<f32>, String> {
        let (r, at) = self.region_of(address, floats)?;
        Ok(self.regions[r].data[at..at + floats].to_vec())
    }

    fn store(&mut self, address: u64, values: &[f32]) -> Result<(), String> {
        let (r, at) = self.region_of(address, values.len())?;
        if !self.regions[r].writable {
            return Err(format!("store into read-only {}", self.regions[r].name));
        }
        self.regions[r].data[at..at + values.len()].copy_from_slice(values);
        Ok(())
    }
}

fn gpr_index(reg: Register) -> usize {
    assert!(reg.is_gpr64(), "{reg:?} is not a 64-bit register");
    // iced lists RAX..R15 in encoding order.
    reg as usize - Register::RAX as usize
}

/// `(lanes, register number)` of a ymm or zmm register.
fn vector_operand(reg: Register) -> Result<(usize, usize), String> {
    if reg.is_zmm() {
        Ok((16, reg as usize - Register::ZMM0 as usize))
    } else if reg.is_ymm() {
        Ok((8, reg as usize - Register::YMM0 as usize))
    } else {
        Err(format!("register {reg:?} is not emulated"))
    }
}
