//! Rule expressions (`constraints.expr`), behind a trait so the language is a choice of the
//! deployment, not of the decision code.
//!
//! The typed thresholds of `constraints.below` cover what the operators asked for and
//! cost nothing; an expression is evaluated per candidate node that passed every other filter,
//! so it is the one filter that may allocate. An expression that fails to evaluate drops the
//! node (fails closed), with the error as the reason.

use std::fmt;
use std::sync::Arc;

use crate::types::{NodeFacts, Request};

/// What an expression sees: one candidate node and the request.
#[derive(Debug, Clone, Copy)]
pub struct ExprInput<'a> {
    pub node: &'a NodeFacts,
    /// The client's RTT to the node's region, when it measured one.
    pub rtt_ms: Option<f64>,
    pub request: &'a Request<'a>,
}

/// A compiled expression.
pub trait Expression: Send + Sync + fmt::Debug {
    /// Whether the node passes. `Err` drops it too, with the message.
    fn eval(&self, input: &ExprInput<'_>) -> Result<bool, String>;
}

/// Compiles expression text when a policy is parsed (so a bad expression refuses the policy).
pub trait ExpressionEngine {
    fn compile(&self, source: &str) -> Result<Arc<dyn Expression>, String>;
}

/// The engine of a build without an expression language: every expression is refused, so a
/// policy that needs one cannot be half-applied.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoExpressions;

impl ExpressionEngine for NoExpressions {
    fn compile(&self, _: &str) -> Result<Arc<dyn Expression>, String> {
        Err("expressions need edgeroute-policy's `cel` feature (or an engine passed to \
             `Policy::parse_with`)"
            .to_owned())
    }
}

/// The engine `Policy::parse` uses: CEL with the `cel` feature, none without.
pub fn default_engine() -> &'static dyn ExpressionEngine {
    #[cfg(feature = "cel")]
    {
        &cel::Cel
    }
    #[cfg(not(feature = "cel"))]
    {
        &NoExpressions
    }
}

#[cfg(feature = "cel")]
pub use cel::Cel;

#[cfg(feature = "cel")]
mod cel {
    //! CEL through `cel-interpreter`. Variables: `node.{id, region, hardware, ttft_p50_ms,
    //! ttft_p99_ms, queue, in_flight, capacity, gpu_util, error_rate}`, `rtt_ms` (-1 when not
    //! measured), `tenant`, `model`, `class`, `streamed`.

    use std::collections::HashMap;
    use std::sync::Arc;

    use cel_interpreter::{Context, Program, Value};

    use super::{ExprInput, Expression, ExpressionEngine};
    use crate::types::Class;

    /// The CEL engine.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Cel;

    struct Compiled {
        source: String,
        program: Program,
    }

    impl std::fmt::Debug for Compiled {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Cel").field("source", &self.source).finish()
        }
    }

    impl ExpressionEngine for Cel {
        fn compile(&self, source: &str) -> Result<Arc<dyn Expression>, String> {
            // cel-parser 0.10 panics on some malformed input (`a <<`: an `unreachable!` in
            // antlr4rust): a policy text must be refused, never crash the process reading it.
            let program = std::panic::catch_unwind(|| Program::compile(source))
                .map_err(|_| "the CEL parser failed on this expression".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(Compiled { source: source.to_owned(), program }))
        }
    }

    impl Expression for Compiled {
        fn eval(&self, input: &ExprInput<'_>) -> Result<bool, String> {
            let n = input.node;
            let mut node: HashMap<String, Value> = HashMap::new();
            node.insert("id".into(), Value::String(Arc::new(n.id.clone())));
            node.insert("region".into(), Value::String(Arc::new(n.region.clone())));
            node.insert("hardware".into(), Value::String(Arc::new(n.hardware.name().into())));
            node.insert("ttft_p50_ms".into(), Value::Float(n.ttft_p50_ms));
            node.insert("ttft_p99_ms".into(), Value::Float(n.ttft_p99_ms));
            node.insert("queue".into(), Value::Int(i64::from(n.queue)));
            node.insert("in_flight".into(), Value::Int(i64::from(n.in_flight)));
            node.insert("capacity".into(), Value::Int(i64::from(n.capacity)));
            node.insert("gpu_util".into(), Value::Float(n.gpu_util));
            node.insert("error_rate".into(), Value::Float(n.error_rate));
            let mut ctx = Context::default();
            ctx.add_variable_from_value("node", node);
            ctx.add_variable_from_value("rtt_ms", Value::Float(input.rtt_ms.unwrap_or(-1.0)));
            let r = input.request;
            ctx.add_variable_from_value("tenant", Value::String(Arc::new(r.claims.sub.clone())));
            ctx.add_variable_from_value("model", Value::String(Arc::new(r.model.to_owned())));
            let class = match r.class {
                Class::Interactive => "interactive",
                Class::Batch => "batch",
            };
            ctx.add_variable_from_value("class", Value::String(Arc::new(class.to_owned())));
            ctx.add_variable_from_value("streamed", Value::Bool(r.streamed));
            match self.program.execute(&ctx) {
                Ok(Value::Bool(b)) => Ok(b),
                Ok(other) => Err(format!("expression gave {other:?}, not a bool")),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}
